"""PocketFlow's ResNet-20 quantization rows and weight sparsity, on real CIFAR-10, with their exported files.

Every run starts from the option-A ResNet-20 (or -56) weights that PocketFlow's tables start
from (`../shared/data/pretrained/option_a`: 91.64% / 92.72% on the 1,017 real test images here),
is one run of the toolkit's own script (`train_cifar.py --arch ResNet-20A --trained_param
...npz`) in its own process on the 5,085-image real training subset, and is tested on the 1,017
real test images. The QAT rows pad training crops black (`--qat_padding`, `--cifar_padding black`),
as the weights were trained: with the toolkit's default reflected borders, the BN statistics of
these weights move by themselves and cost about 2.5 points (BN re-estimated on reflect-padded
crops: 89.09%, on black-padded ones: 91.45%, loaded: 91.64%). The sparsity rows reflect
(`--ws_padding`), as `tfmot_sparsity.py` ran the peer. Rows:

* `fp_ft`: full precision, fine-tuned with the same budget and schedule as the QAT rows (the
  control: what the short fine-tuning on the subset alone does; the QAT rows' drops are also given
  from it);
* `uq_<w>_<a>` / `nuq_<w>_<a>`: weights / activations bits (32 = full precision), per tensor;
* `uq_w<b>_channel`, `uq_w<b>_split`, `nuq_w<b>_...`: weight-only, channel or split (256) buckets;
* `ws<depth>_<sparsity>`: weight sparsity (Zhu-Gupta schedule, uniform protocol, masks every 10
  steps since the budget is short), the CIFAR fine-tuning recipe.

QAT rows use PocketFlow's Adam schedule (the methods' defaults: lr 1e-4, x0.1 at 1/4 and 2/3 of
training) over `--qat_epochs` epochs; PocketFlow trained 60 epochs on the full 50,000 images. The
`--export_seed` run of every row is exported to TFLite fp32 (`export.py`, sparse storage where at least
half the kernel weights are zero) with the file's size, gzip size, top-1 and LiteRT latency at
batch 1 and 128 beside the TF graph's. `--ekg_slimmed` adds the EKG-slimmed ResNet-56 and the
unpruned one, exported and timed the same way.

    python benchmarks/quant_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --weights ../shared/data/pretrained/option_a --seeds 0 1 2 --out runs/quant_bench

Results are kept in `<out>/results.json` across interruptions (finished runs are not redone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import host, run_child

FP_START = {"ResNet-20A": 0.9164, "ResNet-56A": 0.9272}  # the loaded weights on the 1,017 test images
POCKETFLOW_FP = 91.96
# row -> (method flags, PocketFlow's ResNet-20 top-1 for the row or None)
QAT = {
    "fp_ft": (["--method", "none", "--optimizer", "adam", "--learning_rate", "1e-4", "--decay_points", "0.25",
               "0.6667", "--decay_rate", "0.1", "--weight_decay", "2e-4"], 91.96),
    "uq_8_8": (["--method", "uq", "--uq_weight_bits", "8", "--uq_activation_bits", "8"], 92.25),
    "uq_4_4": (["--method", "uq", "--uq_weight_bits", "4", "--uq_activation_bits", "4"], 90.73),
    "uq_w2_channel": (["--method", "uq", "--uq_weight_bits", "2", "--uq_buckets", "channel"], 89.67),
    "uq_w2_split": (["--method", "uq", "--uq_weight_bits", "2", "--uq_buckets", "split"], 91.15),
    "uq_w4_channel": (["--method", "uq", "--uq_weight_bits", "4", "--uq_buckets", "channel"], 92.02),
    "uq_w4_split": (["--method", "uq", "--uq_weight_bits", "4", "--uq_buckets", "split"], 91.98),
    "nuq_4_8": (["--method", "nuq", "--nuq_weight_bits", "4", "--nuq_activation_bits", "8"], 91.70),
    "nuq_2_4": (["--method", "nuq", "--nuq_weight_bits", "2", "--nuq_activation_bits", "4"], 90.31),
    "nuq_w2_channel": (["--method", "nuq", "--nuq_weight_bits", "2", "--nuq_buckets", "channel"], 90.90),
    "nuq_w2_split": (["--method", "nuq", "--nuq_weight_bits", "2", "--nuq_buckets", "split"], 90.02),
}
WS = {f"ws{depth}_{int(s * 100)}": (depth, s) for depth in (20, 56) for s in (0.5, 0.75, 0.9)}


def train_argv(row: str, args) -> tuple:
    if row in QAT:
        arch, flags = "ResNet-20A", QAT[row][0] + ["--train_epoch", str(args.qat_epochs)]
    else:
        depth, sparsity = WS[row]
        arch = f"ResNet-{depth}A"
        flags = ["--method", "ws", "--ws_sparsity", str(sparsity), "--ws_update_every", "10",
                 "--train_epoch", str(args.ws_epochs)]
    weights = os.path.join(args.weights, f"resnet{arch[7:-1]}_cifar10_option_a.npz")
    return arch, ["--arch", arch, "--trained_param", weights, *flags]


def export(params: str, folder: str, log: str, args, sparse: str = "auto") -> dict:
    run_child(["export.py", "--trained_param", params, "--dataset", "cifar10", "--data_path", args.data_path,
               "--out_dir", folder, "--formats", "tflite_fp32", "--sparse", sparse, "--eval", "--latency",
               "--batch_size", "128", "--latency_runs", str(args.latency_runs), "--num_threads", "2"], log)
    with open(os.path.join(folder, "export.json")) as f:
        report = json.load(f)
    entry = report["formats"]["tflite_fp32"]
    return {"tflite_bytes": entry["bytes"], "tflite_gzip_bytes": entry["gzip_bytes"], "sparse": report["sparse"],
            "tflite_top1": entry["eval"]["top1"], "tf_top1": entry["eval"]["tf_top1"],
            "argmax_agreement": entry["eval"]["argmax_agreement"], "tflite_ms": entry["latency_ms"],
            "tf_ms": report["tf"]["latency_ms"]}


def one_run(row: str, seed: int, args) -> dict:
    run = os.path.join(args.out, f"{row}_seed{seed}")
    log = run + ".stdout"
    arch, argv = train_argv(row, args)
    resume = ["--resume"] if os.path.exists(os.path.join(run, "config.json")) else []  # an interrupted run
    wall = run_child(["train_cifar.py", *argv, *resume, "--dataset", "cifar10", "--data_path", args.data_path,
                      "--train_path", run, "--seed", str(seed), "--do_log", "10", "--val_batch_size", "256",
                      "--cifar_padding", args.qat_padding if row in QAT else args.ws_padding], log)["wall"]
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    entry = {"row": row, "seed": seed, "arch": arch, "run": run, "wall": wall, "top1": results["top1"],
             "packed_bytes": results.get("packed_bytes"), "float_bytes": results.get("float_bytes"),
             "sparsity": results.get("sparsity")}
    if seed == args.export_seed:
        entry["export"] = export(os.path.join(run, "trained_params.pkl"), os.path.join(run, "export"), log, args)
    return entry


def summary(entries: list) -> str:
    rows = ["| row | runs | top-1 (mean +- sd) | per seed | drop from start | drop from fp_ft | PocketFlow (drop) | "
            "packed / float bytes | TFLite bytes (gzip) | TFLite top-1 | TFLite ms b1 / b128 | TF ms b1 / b128 |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    control = [100 * e["top1"] for e in entries if e["row"] == "fp_ft"]
    control = statistics.mean(control) if control else float("nan")
    for row in [*QAT, *WS]:
        group = [e for e in entries if e["row"] == row]
        if not group:
            continue
        top1 = [100 * e["top1"] for e in group]
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        drop = 100 * FP_START[group[0]["arch"]] - statistics.mean(top1)
        pf = QAT.get(row, (None, None))[1]
        pf_text = f"{pf:.2f} ({POCKETFLOW_FP - pf:+.2f})" if pf is not None else "-"
        first = group[0]
        packed = f"{first['packed_bytes']:,} / {first['float_bytes']:,}" if first.get("packed_bytes") else "-"
        ex = next((e["export"] for e in group if "export" in e), None)
        if ex:
            files = f"{ex['tflite_bytes']:,} ({ex['tflite_gzip_bytes']:,})"
            lite = f"{ex['tflite_ms']['batch_1']:.2f} / {ex['tflite_ms']['batch_128']:.1f}"
            tf = f"{ex['tf_ms']['batch_1']:.2f} / {ex['tf_ms']['batch_128']:.1f}"
            lite_top1 = f"{100 * ex['tflite_top1']:.2f}"
        else:
            files = lite = tf = lite_top1 = "-"
        rows.append(f"| {row} | {len(group)} | {statistics.mean(top1):.2f} +- {sd:.2f} | "
                    f"{' / '.join(f'{v:.2f}' for v in top1)} | {drop:+.2f} | "
                    f"{(control - statistics.mean(top1)) if row in QAT else float('nan'):+.2f} | {pf_text} | {packed} | {files} | "
                    f"{lite_top1} | {lite} | {tf} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--weights", required=True, help="folder of resnet{20,56}_cifar10_option_a.npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=[*QAT, *WS], choices=[*QAT, *WS])
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--ws_epochs", type=int, default=4)
    parser.add_argument("--latency_runs", type=int, default=20)
    parser.add_argument("--qat_padding", default="black", choices=("black", "reflect"),
                        help="--cifar_padding of the QAT rows (black: as the option-A weights were trained)")
    parser.add_argument("--ws_padding", default="reflect", choices=("black", "reflect"),
                        help="--cifar_padding of the sparsity rows (reflect: as tfmot_sparsity.py's peer runs)")
    parser.add_argument("--export_seed", type=int, default=0, help="the seed whose runs are exported and timed")
    parser.add_argument("--ekg_slimmed", default=None, help="an EKG-slimmed ResNet-56 params pickle to export too")
    parser.add_argument("--unpruned", default=None, help="the unpruned ResNet-56 params pickle (with --ekg_slimmed)")
    parser.add_argument("--out", default="runs/quant_bench")
    parser.add_argument("--table_only", action="store_true", help="print the table of the runs done, run nothing")
    args = parser.parse_args(argv)
    if args.table_only:
        args.seeds, args.ekg_slimmed = [], None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host(), "exports": {}}
    for seed in args.seeds:
        for row in args.rows:
            if any(e["row"] == row and e["seed"] == seed for e in saved["runs"]):
                continue
            print(f"{time.strftime('%H:%M:%S')} {row} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
            entry = one_run(row, seed, args)
            entry["load_after"] = os.getloadavg()
            saved["runs"].append(entry)
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
            print(f"  top-1 {100 * entry['top1']:.2f}, {entry['wall']:.0f} s", flush=True)
    if args.ekg_slimmed and args.unpruned:
        for name, params in (("unpruned", args.unpruned), ("ekg_slimmed", args.ekg_slimmed)):
            if name not in saved["exports"]:
                saved["exports"][name] = export(params, os.path.join(args.out, f"export_{name}"),
                                                os.path.join(args.out, f"export_{name}.stdout"), args, sparse="off")
        with open(path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(path + ".tmp", path)
    print(f"host: {saved['host']}")
    print(summary(saved["runs"]))
    for name, ex in saved.get("exports", {}).items():
        print(f"{name}: TFLite {ex['tflite_bytes']:,} B, top-1 {100 * ex['tflite_top1']:.2f} (TF "
              f"{100 * ex['tf_top1']:.2f}), TFLite ms b1 {ex['tflite_ms']['batch_1']:.2f} b128 "
              f"{ex['tflite_ms']['batch_128']:.1f}; TF ms b1 {ex['tf_ms']['batch_1']:.2f} b128 {ex['tf_ms']['batch_128']:.1f}")


if __name__ == "__main__":
    main()
