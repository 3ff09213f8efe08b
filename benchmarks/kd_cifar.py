"""Hinton KD on real CIFAR-10 from the EKG authors' ResNet-56, against the same training without it.

For every seed, each method is a run of the toolkit's own script (`train_cifar.py`) in its own
process, on the 5,085-image real training subset, accuracy on the 1,017 real test images:

* `scratch_ce`: ResNet-20 trained from scratch for `--scratch_epochs` epochs (`--method none`,
  the CIFAR scratch recipe: lr 0.05, x0.1 at 30/60/90%, weight decay 1e-4);
* `scratch_kd`: the same ResNet-20, same epochs and recipe, with Hinton KD from the ResNet-56
  (`--method kd --teacher_param ... --teacher_arch ResNet-56`, T 4, weight 1);
* `l1_ce`: the ResNet-56 L1-pruned to 45% of the FLOPs, fine-tuned `--finetune_epochs` epochs with
  plain cross-entropy (`--method l1`);
* `l1_kd`: the same pruned net fine-tuned with Hinton KD from the unpruned ResNet-56
  (`--method l1,kd`: the chain leaves the fine-tuning to the distillation);
* `l1_kd_pf`: `l1_kd` in PocketFlow's convention (`--kd_convention pocketflow --kd_weight 4`, T 4:
  Hinton's weight 0.25 with T 4), a lighter distillation term for so short a fine-tuning;
* `ekg`: EKG to the same target with its memory-bank KD over the same epochs (`--method ekg`).

All fine-tunings use the CIFAR fine-tuning recipe (lr 0.01, x0.2 at 30/60/80%, weight decay
5e-4, batch 128). Writes `<out>/results.json` (kept across interruptions: finished runs are not
redone) and `benchmarks/results/kd_*.json` rows for `benchmarks/plot_results.py`.

    python benchmarks/kd_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --trained_param ../shared/data/pretrained/res56_cifar10.pkl --seeds 0 1 2 --out runs/kd_bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import ROOT as _ROOT, host, run_child

METHODS = ("scratch_ce", "scratch_kd", "l1_ce", "l1_kd", "l1_kd_pf", "ekg")
PRUNED = ("CIFAR-10, the EKG authors' ResNet-56 (93.51% on the 1,017 real test images), fine-tuned on the real "
          "5,085-image training subset; pruned nets at 45% of the FLOPs (EKG convention)")
SCRATCH = ("CIFAR-10 ResNet-20 trained from scratch on the real 5,085-image subset, with and without KD from the "
           "EKG authors' ResNet-56 (93.51%); FLOPs as a fraction of ResNet-56's")
RESNET56_FLOPS = 126_837_376  # EKG convention, the unpruned teacher (nets.build("ResNet-56").cost())


def one_run(method: str, seed: int, args) -> dict:
    run = os.path.join(args.out, f"{method}_seed{seed}")
    log = os.path.join(args.out, f"{method}_seed{seed}.stdout")
    common = ["--dataset", "cifar10", "--data_path", args.data_path, "--train_path", run, "--seed", str(seed),
              "--do_log", "10", "--val_batch_size", "256"]
    teacher = ["--teacher_param", args.trained_param, "--teacher_arch", "ResNet-56",
               "--kd_temperature", str(args.temperature), "--kd_weight", str(args.weight)]
    finetune = ["--arch", "ResNet-56", "--trained_param", args.trained_param, "--train_epoch",
                str(args.finetune_epochs), "--search_target_rate", "0.45"]
    scratch = ["--arch", "ResNet-20", "--train_epoch", str(args.scratch_epochs)]
    argv = {"scratch_ce": ["--method", "none", *scratch],
            "scratch_kd": ["--method", "kd", *scratch, *teacher],
            "l1_ce": ["--method", "l1", *finetune],
            "l1_kd": ["--method", "l1,kd", *finetune, "--kd_temperature", str(args.temperature),
                      "--kd_weight", str(args.weight)],
            "l1_kd_pf": ["--method", "l1,kd", *finetune, "--kd_convention", "pocketflow", "--kd_temperature", "4",
                         "--kd_weight", "4"],
            "ekg": ["--method", "ekg", *finetune]}[method]
    proc = run_child(["train_cifar.py", *argv, *common], log)
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    entry = {"method": method, "seed": seed, "run": run, "wall": proc["wall"], "top1": results["top1"],
             "ekg_flops": results["ekg_flops"], "params": results["params"],
             "steps": {k: {"top1": v.get("top1"), "before_finetune_top1": v.get("before_finetune_top1")}
                       for k, v in results["steps"].items()}}
    with open(os.path.join(run, "timings.json")) as f:
        entry["timings"] = json.load(f)
    return entry


def summary(entries: list) -> str:
    rows = ["| method | runs | top-1 (mean +- sd) | per seed | FLOPs (EKG) | wall per run (s) |",
            "|---|---:|---:|---|---:|---:|"]
    for method in METHODS:
        group = [e for e in entries if e["method"] == method]
        if not group:
            continue
        top1 = [100 * e["top1"] for e in group]
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        walls = [e["wall"] for e in group]
        rows.append(f"| {method} | {len(group)} | {statistics.mean(top1):.2f} +- {sd:.2f} | "
                    f"{' / '.join(f'{v:.2f}' for v in top1)} | {group[0]['ekg_flops'] / 1e6:.2f} M | "
                    f"{min(walls):.0f}-{max(walls):.0f} |")
    return "\n".join(rows)


LABELS = {"scratch_ce": "ResNet-20 from scratch, CE", "scratch_kd": "ResNet-20 from scratch, Hinton KD",
          "l1_ce": "L1, {e} CE epochs (kd_cifar.py)", "l1_kd": "L1, {e} Hinton-KD epochs (l1,kd)",
          "l1_kd_pf": "L1, {e} KD epochs, PocketFlow convention", "ekg": "EKG, {e} KD epochs"}


def write_rows(entries: list, args) -> str:
    """The runs as `benchmarks/results` rows for the figure (one file per benchmark of this script)."""
    machine = host()
    files = {}
    for e in entries:
        scratch = e["method"].startswith("scratch")
        title = SCRATCH if scratch else PRUNED
        label = LABELS[e["method"]].format(e=args.finetune_epochs)
        if scratch:
            label += f", {args.scratch_epochs} epochs"
        files.setdefault(title, []).append({"label": label, "seed": e["seed"], "top1": e["top1"],
                                            "flops_rate": e["ekg_flops"] / RESNET56_FLOPS,
                                            "wall_s": round(e["wall"]), "host": machine})
    written = []
    for title, rows in files.items():
        name = "kd_scratch" if title == SCRATCH else f"kd_pruned_ft{args.finetune_epochs}"
        path = os.path.join(_ROOT, "benchmarks", "results", f"{name}.json")
        data = {"benchmark": title, "figure": "cifar_10_kd_scratch" if title == SCRATCH else None,
                "source": f"benchmarks/kd_cifar.py, {time.strftime('%Y-%m-%d')}",
                "unpruned": {"label": "teacher / unpruned ResNet-56", "top1": 0.9351, "flops_rate": 1.0},
                "runs": rows}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        written.append(path)
    return ", ".join(written)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--trained_param", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--scratch_epochs", type=int, default=30)
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--out", default="runs/kd_bench")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host()}
    for seed in args.seeds:
        for method in args.methods:
            if any(e["method"] == method and e["seed"] == seed for e in saved["runs"]):
                continue
            print(f"{time.strftime('%H:%M:%S')} {method} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
            entry = one_run(method, seed, args)
            entry["load_after"] = os.getloadavg()
            saved["runs"].append(entry)
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
            print(f"  top-1 {100 * entry['top1']:.2f}, {entry['wall']:.0f} s", flush=True)
    print(f"host: {saved['host']}")
    print(summary(saved["runs"]))
    print("rows:", write_rows(saved["runs"], args))


if __name__ == "__main__":
    main()
