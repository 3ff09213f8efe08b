"""Shunt connections on the real CIFAR-10 subset: one shunt and two, with and without KD, several seeds.

Each configuration is one run of the toolkit's own `train_cifar.py --method shunt` in its own process,
from a trained original (`--trained_param`, default the EKG authors' ResNet-56; or `--base_epochs N`
to train `--arch` here first, as for MobileNetV2). A configuration names its shunts (`--one`, `--two`:
first:last block names) or lets the method place one by knowledge quotient (`auto`, at
`--flops_target`). The shunt and final trainings' budgets are flags; the defaults are far below the
original's 120 + 300 epochs, and the table says which were used.

    python benchmarks/shunt_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --trained_param ../shared/data/pretrained/res56_cifar10.pkl --arch ResNet-56 \\
        --configs auto auto_kd --seeds 0 1 2 --out runs/shunt_r56

Writes `<out>/results.json` (finished runs are kept across interruptions and not redone) and prints a
Markdown table: FLOPs cut, top-1 of the original, the shunt-inserted net and the final net, the drop,
latency at batch 1 and 128. `--smoke` runs every step with 2 steps per epoch, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from common import host, run_all, run_child
from ekg_cifar import percent_mean_sd, read

# <placement>[_kd|_kd1]: auto (by knowledge quotient), one or two named runs; _kd: Hinton KD at the original's
# intended T 5, weight 4; _kd1: weight 1.
CONFIGS = tuple(f"{p}{k}" for p in ("auto", "one", "two") for k in ("", "_kd", "_kd1"))


def base_run(args) -> str:
    if args.trained_param:
        return args.trained_param
    run = os.path.join(args.out, "base")
    if not os.path.exists(os.path.join(run, "trained_params.pkl")):
        run_child(["train_cifar.py", "--method", "none", "--arch", args.arch, "--dataset", "cifar10", "--data_path",
                   args.data_path, "--train_path", run, "--seed", "0", "--train_epoch", str(args.base_epochs),
                   "--do_log", "10", *args.extra], os.path.join(args.out, "base.stdout"))
    return os.path.join(run, "trained_params.pkl")


def shunt_run(config: str, seed: int, base: str, args) -> dict:
    run = os.path.join(args.out, f"{config}_seed{seed}")
    options = ["--shunt_epochs", str(args.shunt_epochs), "--shunt_batch_size", str(args.batch_size),
               "--shunt_arch", str(args.shunt_arch), "--train_epoch", str(args.final_epochs),
               "--batch_size", str(args.batch_size), "--shunt_flops_target", str(args.flops_target)]
    if args.shunt_widths:
        options += ["--shunt_expand", str(args.shunt_widths[0]), "--shunt_bottleneck", str(args.shunt_widths[1])]
    if config.startswith("one"):
        options += ["--shunt_blocks", args.one]
    elif config.startswith("two"):
        options += ["--shunt_blocks", args.two]
    if "_kd" in config:
        options += ["--shunt_kd_weight", "1" if config.endswith("_kd1") else "4", "--shunt_kd_temperature", "5"]
    proc = run_child(["train_cifar.py", "--method", "shunt", "--arch", args.arch, "--dataset", "cifar10",
                      "--data_path", args.data_path, "--train_path", run, "--seed", str(seed), "--trained_param", base,
                      "--do_log", "10", *options, *args.extra], os.path.join(args.out, f"{config}_seed{seed}.stdout"))
    results = read(run, "results.json")
    step = os.path.join(run, "1-shunt")
    timings = read(run, "timings.json")
    return {"config": config, "seed": seed, "wall": proc["wall"], "shunts": results["shunts"],
            "flops_cut": results["flops_cut"], "macs_cut": results["macs_cut"],
            "top1": {k: v["top1"] for k, v in results["nets"].items()},
            "params": {k: v["params"] for k, v in results["nets"].items()},
            "latency": {k: results["nets"][k]["latency"] for k in ("original", "final")},
            "quotients": read(step, "knowledge_quotients.json"),
            "stage_seconds": {k.split("/")[-1]: v for k, v in timings.items() if k.startswith("1-shunt")}}


def table(saved: dict) -> str:
    rows = ["| config | shunts | runs | FLOPs cut | original | shunt inserted | final (mean +- sd) | drop | "
            "latency b1 orig -> final (ms) | b128 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config in CONFIGS:
        group = [e for e in saved["runs"] if e["config"] == config]
        if not group:
            continue
        shunts = ", ".join(f"{s['first']}..{s['last']}" for s in group[0]["shunts"])
        original = statistics.mean(e["top1"]["original"] for e in group)
        final = [e["top1"]["final"] for e in group]
        lat = {b: [(e["latency"]["original"][f"batch_{b}_ms"], e["latency"]["final"][f"batch_{b}_ms"]) for e in group]
               for b in (1, 128)}
        rows.append(f"| {config} | {shunts} | {len(group)} | {100 * statistics.mean(e['flops_cut'] for e in group):.1f}% "
                    f"| {100 * original:.2f} | {percent_mean_sd([e['top1']['shunt_inserted'] for e in group])} "
                    f"| {percent_mean_sd(final)} | {100 * (original - statistics.mean(final)):.2f} | "
                    + " | ".join(f"{statistics.mean(a for a, _ in lat[b]):.1f} -> {statistics.mean(f for _, f in lat[b]):.1f}"
                                 for b in (1, 128)) + " |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--arch", default="ResNet-56")
    parser.add_argument("--trained_param", default=None, help="the original (default: trained here, --base_epochs)")
    parser.add_argument("--base_epochs", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=["auto", "auto_kd"], choices=CONFIGS)
    parser.add_argument("--one", default="block1:block6", help="the one-shunt configs' --shunt_blocks")
    parser.add_argument("--two", default="block1:block6,block13:block14", help="the two-shunt configs' --shunt_blocks")
    parser.add_argument("--flops_target", type=float, default=0.335)
    parser.add_argument("--shunt_arch", type=int, default=1)
    parser.add_argument("--shunt_widths", type=int, nargs=2, default=None, help="expand and bottleneck widths")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shunt_epochs", type=int, default=10)
    parser.add_argument("--final_epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="2 steps per epoch everywhere (checks the script)")
    parser.add_argument("--out", default="runs/shunt_bench")
    args = parser.parse_args(argv)
    args.extra = ["--steps_per_epoch", "2"] if args.smoke else []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host()}
    saved["budget"] = {"shunt_epochs": args.shunt_epochs, "final_epochs": args.final_epochs,
                       "batch_size": args.batch_size, "arch": args.arch, "shunt_arch": args.shunt_arch,
                       "shunt_widths": args.shunt_widths}
    base = base_run(args)
    run_all(saved, path, [(seed, name) for seed in args.seeds for name in args.configs], "config",
            lambda seed, name: shunt_run(name, seed, base, args))
    print(f"{args.arch}; budget {saved['budget']}; host {saved['host']}")
    print(table(saved))


if __name__ == "__main__":
    main()
