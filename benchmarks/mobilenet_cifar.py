"""MobileNetV2 (CIFAR) trained on the real CIFAR-10 subset, then pruned to 50% of the FLOPs by `cp` and by L1.

Issue 17's second comparison: the residual streams and depthwise groups of MobileNetV2 make channel
pruning a group problem that PocketFlow could not prune. Steps, each one run of the toolkit's own
`train_cifar.py` in its own process:

1. `base`: MobileNetV2 from scratch on the training images of `--data_path` (`--method none`, the
   CIFAR scratch recipe over `--base_epochs` epochs, seed 0), once;
2. per seed: `--method cp` and `--method l1` from that net to `--target` of the FLOPs (EKG
   convention), then the same fine-tuning (`ekg_cifar.py`'s preset, `--finetune_epochs` epochs).

    python benchmarks/mobilenet_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --seeds 0 1 2 --out runs/mobilenet_bench

Writes `<out>/results.json` (kept across interruptions: finished runs are not redone) and prints
a Markdown table. `--smoke` runs every step with 2 steps per epoch, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from common import host, run_all, run_child
from ekg_cifar import FINETUNE, percent_mean_sd, read, step_dir

METHODS = ("cp", "l1")


def base_run(args) -> str:
    run = os.path.join(args.out, "base")
    if not os.path.exists(os.path.join(run, "trained_params.pkl")):
        run_child(["train_cifar.py", "--method", "none", "--arch", "MobileNetV2", "--dataset", "cifar10",
                   "--data_path", args.data_path, "--train_path", run, "--seed", "0", "--train_epoch",
                   str(args.base_epochs), "--do_log", "10", *args.extra], os.path.join(args.out, "base.stdout"))
    return os.path.join(run, "trained_params.pkl")


def pruned_run(method: str, seed: int, base: str, args) -> dict:
    run = os.path.join(args.out, f"{method}_seed{seed}")
    options = ["--search_target_rate", str(args.target), "--search_batch_size", "128"]
    if method == "cp":
        options += ["--cp_batches", str(args.cp_batches)]
    proc = run_child(["train_cifar.py", "--method", method, "--arch", "MobileNetV2", "--dataset", "cifar10",
                      "--data_path", args.data_path, "--train_path", run, "--seed", str(seed), "--trained_param", base,
                      "--train_epoch", str(args.finetune_epochs), "--do_log", "10", *FINETUNE, *options, *args.extra],
                     os.path.join(args.out, f"{method}_seed{seed}.stdout"))
    results, pruned = read(run, "results.json"), read(step_dir(run), "prune_results.json")
    return {"method": method, "seed": seed, "wall": proc["wall"], "top1": results["top1"],
            "before_finetune_top1": pruned["before_finetune_top1"], "flops_rate": pruned["flops_rate"],
            "params": pruned["slimmed_params"], "pruning_seconds": pruned.get("pruning_seconds"),
            "widths": pruned["widths"]}


def table(saved: dict) -> str:
    rows = ["| method | runs | top-1 before FT (mean +- sd) | top-1 after FT (mean +- sd) | FLOPs rate | params |",
            "|---|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        group = [e for e in saved["runs"] if e["method"] == method]
        if not group:
            continue
        rows.append(f"| {method} | {len(group)} | {percent_mean_sd([e['before_finetune_top1'] for e in group])} "
                    f"| {percent_mean_sd([e['top1'] for e in group])} | {statistics.mean(e['flops_rate'] for e in group):.4f} "
                    f"| {group[0]['params'] / 1e6:.3f} M |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base_epochs", type=int, default=60, help="training of the unpruned MobileNetV2")
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--cp_batches", type=int, default=4, help="cp: batches of 128 images sampled per group")
    parser.add_argument("--smoke", action="store_true", help="2 steps per epoch everywhere (checks the script)")
    parser.add_argument("--out", default="runs/mobilenet_bench")
    args = parser.parse_args(argv)
    args.extra = ["--steps_per_epoch", "2"] if args.smoke else []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host()}
    base = base_run(args)
    saved["base_top1"] = read(os.path.join(args.out, "base"), "results.json")["top1"]
    run_all(saved, path, [(seed, name) for seed in args.seeds for name in METHODS], "method",
            lambda seed, name: pruned_run(name, seed, base, args))
    print(f"unpruned MobileNetV2: top-1 {100 * saved['base_top1']:.2f}; host {saved['host']}")
    print(table(saved))


if __name__ == "__main__":
    main()
