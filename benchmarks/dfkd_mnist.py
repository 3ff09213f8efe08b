"""Data-free distillation on the complete MNIST: Lopes et al.'s table, one pair at a time.

For a pair (`fc`: hinton-1200 -> hinton-800 on 28x28; `conv`: LeNet-5-32 -> LeNet-5-half on MNIST
resized to 32x32), each step one run of the toolkit's own `train_cifar.py` in its own process:

1. `teacher` and `scratch`: the teacher and the student trained on the 60,000 training images with
   the paper's settings (Adam 1e-3, batch 64, 10 epochs, no weight decay), once;
2. `kd`: the student distilled from the teacher on the real training images (`--method kd`, T 8);
3. per objective and seed: `--method dfkd` from the teacher, the statistics computed once (the
   first run's `teacher_stats.npz`, passed to the others with `--dfkd_stats`), the reconstruction
   and the distillation on it alone; accuracy on the 10,000 real test images.

    python benchmarks/dfkd_mnist.py --data_path ../shared/data/mnist --pair conv --seeds 0 1 2 \\
        --out runs/dfkd_bench

`--batches_per_class`, `--steps` and `--distill_epochs` shrink the budget (the paper: 100, 1000,
30). Writes `<out>/<pair>/results.json` (finished runs are not redone) and prints a Markdown row.
`--smoke` runs everything with tiny budgets, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import host, run_child

PAIRS = {"fc": ("hinton-1200", "hinton-800", []),
         "conv": ("LeNet-5-32", "LeNet-5-half", ["--image_size", "32"])}
OBJECTIVES = {"fc": ("top_layer", "all_layers", "all_layers_dropout", "spectral_all_layers", "spectral_layer_pairs"),
              "conv": ("top_layer", "all_layers", "spectral_all_layers", "spectral_layer_pairs")}
PAPER = ["--optimizer", "adam", "--learning_rate", "1e-3", "--batch_size", "64", "--train_epoch", "10",
         "--weight_decay", "0", "--schedule", "constant"]


def read(run: str, name: str) -> dict:
    with open(os.path.join(run, name)) as f:
        return json.load(f)


def trained(name: str, arch: str, args, extra=()) -> str:
    run = os.path.join(args.pair_dir, name)
    if not os.path.exists(os.path.join(run, "results.json")):
        run_child(["train_cifar.py", "--arch", arch, "--dataset", "mnist", "--data_path", args.data_path,
                   "--train_path", run, "--do_log", "200", *args.image, *PAPER, *extra, *args.engine],
                  os.path.join(args.pair_dir, f"{name}.stdout"))
    return run


def dfkd_run(objective: str, seed: int, teacher_arch: str, student_arch: str, teacher: str, stats, args) -> dict:
    run = os.path.join(args.pair_dir, f"{objective}_seed{seed}")
    options = ["--method", "dfkd", "--arch", teacher_arch, "--trained_param", teacher, "--student_arch", student_arch,
               "--dfkd_objective", objective, "--dfkd_steps", str(args.steps), "--dfkd_batches_per_class",
               str(args.batches_per_class), "--train_epoch", str(args.distill_epochs), "--seed", str(seed),
               "--ckpt_every_steps", "200"]
    if args.distill_lr is not None:
        options += ["--learning_rate", str(args.distill_lr)]
    if stats and os.path.exists(stats) and objective not in ("spectral_all_layers", "spectral_layer_pairs"):
        options += ["--dfkd_stats", stats]
    proc = run_child(["train_cifar.py", "--dataset", "mnist", "--data_path", args.data_path, "--train_path", run,
                      "--do_log", "500", *args.image, *options, *args.engine],
                     os.path.join(args.pair_dir, f"{objective}_seed{seed}.stdout"))
    step = os.path.join(run, "1-dfkd")
    report = read(step, "reconstruct.json")
    return {"objective": objective, "seed": seed, "top1": read(run, "results.json")["top1"], "wall": proc["wall"],
            "reconstruct_seconds": sum(s["seconds"] for s in report["shards"]),
            "images_per_second": report["images_per_second"],
            "teacher_top1_on_images": statistics.mean(s["teacher_top1"] for s in report["shards"]),
            "stats": os.path.join(step, "teacher_stats.npz")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="conv")
    parser.add_argument("--objectives", nargs="+", help="default: every objective of the pair")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches_per_class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--distill_epochs", type=int, default=30)
    parser.add_argument("--distill_lr", type=float, default=None,
                        help="Adam learning rate of the distillation (default: the method's, the original's 1e-5)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets everywhere (checks the script)")
    parser.add_argument("--out", default="runs/dfkd_bench")
    args = parser.parse_args(argv)
    teacher_arch, student_arch, args.image = PAIRS[args.pair]
    args.engine = ["--steps_per_epoch", "2", "--train_epoch", "1"] if args.smoke else []
    if args.smoke:
        args.batches_per_class, args.steps, args.distill_epochs = 1, 2, 1
    args.pair_dir = os.path.join(args.out, args.pair)
    os.makedirs(args.pair_dir, exist_ok=True)
    path = os.path.join(args.pair_dir, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host()}

    teacher = trained("teacher", teacher_arch, args, ["--method", "none"])
    scratch = trained("scratch", student_arch, args, ["--method", "none"])
    kd = trained("kd", student_arch, args, ["--method", "kd", "--teacher_param",
                                            os.path.join(teacher, "trained_params.pkl"), "--teacher_arch",
                                            teacher_arch, "--kd_temperature", "8", "--kd_weight", "1"])
    saved.update({name: read(run, "results.json")["top1"] for name, run in
                  (("teacher", teacher), ("scratch", scratch), ("kd", kd))})
    stats = next((e["stats"] for e in saved["runs"] if os.path.exists(e["stats"])), None)
    for objective in args.objectives or OBJECTIVES[args.pair]:
        for seed in args.seeds:
            if any(e["objective"] == objective and e["seed"] == seed for e in saved["runs"]):
                continue
            print(f"{time.strftime('%H:%M:%S')} {objective} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
            entry = dfkd_run(objective, seed, teacher_arch, student_arch, os.path.join(teacher, "trained_params.pkl"),
                             stats, args)
            stats = stats or entry["stats"]
            saved["runs"].append(entry)
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
    row = [f"{100 * saved[k]:.2f}" for k in ("teacher", "scratch", "kd")]
    for objective in OBJECTIVES[args.pair]:
        tops = [100 * e["top1"] for e in saved["runs"] if e["objective"] == objective]
        row.append(f"{statistics.mean(tops):.2f} +- {statistics.pstdev(tops):.2f} ({len(tops)})" if tops else "-")
    print(f"host {saved['host']}; {teacher_arch} -> {student_arch}")
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
