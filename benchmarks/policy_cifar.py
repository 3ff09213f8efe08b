"""The DDPG policy search against uniform settings on the real CIFAR-10 subset, several seeds.

Each configuration is a pair of runs of the toolkit's own `train_cifar.py` from the same trained net
(default the EKG authors' ResNet-56), with the same learner and fine-tuning budget: `--method rl_*`
searching per-layer settings, and the same method with `--rl_uniform` (every layer at the target,
scored the same way, no search). Configurations:

* `cp45`: channel pruning to 45% of the FLOPs (`rl_cp`, L1 inner pruner), then `--finetune_epochs`
  of fine-tuning; reward: held-out top-1;
* `cp45cp`: the same with the `cp` inner pruner: roll-outs keep LASSO's channels, the final net is
  pruned by LASSO and least squares (`cp`) at the ratios found (the uniform run: `cp` at uniform
  ratios);
* `uq4`, `uq2`: uniform quantization of the weights at 4 / 2 equivalent bits (`rl_uq`, bits in
  [2, 8] / [1, 8]), then `--qat_epochs` of quantization-aware training; reward: minus the held-out
  loss (the net was trained on the held-out images too: their top-1 saturates at 4 bits).

    python benchmarks/policy_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --trained_param ../shared/data/pretrained/res56_cifar10.pkl --configs cp45 uq4 uq2 --seeds 0 1 2 \\
        --out runs/policy_bench

Searches of PocketFlow's length by default (200 roll-outs, 50 of them random warm-up); `--rollouts 40
--warmup 10` for the short ones. Each budget needs its own `--out` (finished runs are not redone).
Writes `<out>/results.json` (finished runs are kept across interruptions and not redone) and prints a
Markdown table: the held-out score of the uniform policy and of the best roll-out, test top-1 after
the learner for uniform and RL (mean +- sd), roll-outs, search seconds and roll-outs per hour.
`--smoke` runs every step with 2 steps per epoch and 3 roll-outs, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from common import host, run_all, run_child
from ekg_cifar import percent_mean_sd, read

CONFIGS = {
    "cp45": ("rl_cp", ["--search_target_rate", "0.45", "--rl_reward", "top1"], "finetune_epochs"),
    "cp45cp": ("rl_cp", ["--search_target_rate", "0.45", "--rl_reward", "top1", "--rl_pruner", "cp"],
               "finetune_epochs"),
    "uq4": ("rl_uq", ["--uq_weight_bits", "4", "--rl_reward", "loss"], "qat_epochs"),
    "uq2": ("rl_uq", ["--uq_weight_bits", "2", "--rl_min_bits", "1", "--rl_reward", "loss"], "qat_epochs"),
}


def policy_run(name: str, seed: int, args) -> dict:
    config, policy = name.rsplit("_", 1)
    method, options, epochs = CONFIGS[config]
    run = os.path.join(args.out, f"{name}_seed{seed}")
    search = ["--rl_rollouts", str(args.rollouts), "--rl_warmup", str(args.warmup), "--rl_val_images",
              str(args.val_images), "--rl_bn_images", str(args.bn_images), "--rl_tune_steps", str(args.tune_steps)]
    proc = run_child(["train_cifar.py", "--method", method, "--arch", args.arch, "--dataset", "cifar10",
                      "--data_path", args.data_path, "--train_path", run, "--seed", str(seed), "--trained_param",
                      args.trained_param, "--train_epoch", str(getattr(args, epochs)), "--do_log", "10", *options,
                      *search, *(["--rl_uniform"] if policy == "uniform" else []), *args.extra],
                     os.path.join(args.out, f"{name}_seed{seed}.stdout"))
    results = read(run, "results.json")
    step = os.path.join(run, f"1-{method}")
    report = read(step, "search/search.json")
    timings = read(run, "timings.json")
    best = report["best"] or report["uniform"]
    entry = {"config": name, "seed": seed, "wall": proc["wall"], "top1": results["top1"],
             "held_out_uniform": {k: report["uniform"][k] for k in ("top1", "loss")},
             "held_out_best": {k: best[k] for k in ("top1", "loss")}, "rollouts": len(report["rollouts"]),
             "search_seconds": timings.get(f"1-{method}/search"), "rollouts_per_hour": report.get("rollouts_per_hour"),
             "policy": json.load(open(os.path.join(step, "policy.json"))),
             "rewards": [r["reward"] for r in report["rollouts"]],
             "best_rollout": report["best"]["rollout"] if report["best"] else None}
    for key in ("flops_rate", "before_finetune_top1"):
        if key in results:
            entry[key] = results[key]
    if method == "rl_uq":
        entry["equivalent_bits"] = read(step, "quantized.json")["equivalent_bits"]
    return entry


def table(saved: dict) -> str:
    rows = ["| config | runs | held-out uniform (top-1 / loss) | held-out best roll-out | budget used | "
            "test top-1 uniform | test top-1 RL | RL - uniform | roll-outs (best found by a roll-out) | search (s) | "
            "roll-outs/h |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config in CONFIGS:
        uniform = [e for e in saved["runs"] if e["config"] == f"{config}_uniform"]
        rl = [e for e in saved["runs"] if e["config"] == f"{config}_rl"]
        if not rl or not uniform:
            continue
        used = "flops_rate" if config.startswith("cp") else "equivalent_bits"
        mean = statistics.mean
        rows.append(
            f"| {config} | {len(rl)} + {len(uniform)} | {100 * mean(e['held_out_uniform']['top1'] for e in rl):.2f} / "
            f"{mean(e['held_out_uniform']['loss'] for e in rl):.3f} | "
            f"{100 * mean(e['held_out_best']['top1'] for e in rl):.2f} / {mean(e['held_out_best']['loss'] for e in rl):.3f}"
            f" | {mean(e[used] for e in uniform):.3f} -> {mean(e[used] for e in rl):.3f} | "
            f"{percent_mean_sd([e['top1'] for e in uniform])} | {percent_mean_sd([e['top1'] for e in rl])} | "
            f"{100 * (mean(e['top1'] for e in rl) - mean(e['top1'] for e in uniform)):+.2f} | "
            f"{rl[0]['rollouts']} ({sum(e.get('best_rollout', 0) >= 0 for e in rl)} of {len(rl)}) | "
            f"{mean(e['search_seconds'] for e in rl):.0f} | "
            f"{mean(e['rollouts_per_hour'] for e in rl):.0f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--arch", default="ResNet-56")
    parser.add_argument("--trained_param", required=True)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--val_images", type=int, default=500)
    parser.add_argument("--bn_images", type=int, default=256)
    parser.add_argument("--tune_steps", type=int, default=0)
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 steps per epoch and 3 roll-outs (checks the script)")
    parser.add_argument("--out", default="runs/policy_bench")
    args = parser.parse_args(argv)
    args.extra = ["--steps_per_epoch", "2"] if args.smoke else []
    if args.smoke:
        args.rollouts, args.warmup = 3, 2
        args.extra += ["--rl_batch_size", "8"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": [], "host": host()}
    saved["budget"] = {k: getattr(args, k) for k in ("arch", "rollouts", "warmup", "val_images", "bn_images",
                                                     "tune_steps", "finetune_epochs", "qat_epochs")}
    jobs = [(seed, f"{config}_{policy}") for seed in args.seeds for config in args.configs
            for policy in ("uniform", "rl")]
    run_all(saved, path, jobs, "config", lambda seed, name: policy_run(name, seed, args))
    print(f"{args.arch}; budget {saved['budget']}; host {saved['host']}")
    print(table(saved))


if __name__ == "__main__":
    main()
