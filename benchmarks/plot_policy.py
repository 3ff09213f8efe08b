"""The policy search at a glance: each configuration's roll-out rewards against the roll-out (every seed,
the warm-up shaded, the uniform policy's reward as a line), and test top-1 of uniform against RL.

    python benchmarks/plot_policy.py --results runs/policy_bench/results.json --out docs/figures/policy.png

Reads `policy_cifar.py`'s results file. Needs matplotlib (a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--out", default="docs/figures/policy.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        saved = json.load(f)
    configs = list(dict.fromkeys(e["config"].rsplit("_", 1)[0] for e in saved["runs"]))
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 6.4), squeeze=False)
    warmup = saved["budget"]["warmup"]
    for column, config in enumerate(configs):
        curve, bars = axes[0][column], axes[1][column]
        rl = [e for e in saved["runs"] if e["config"] == f"{config}_rl"]
        uniform = [e for e in saved["runs"] if e["config"] == f"{config}_uniform"]
        for entry in rl:
            curve.plot(range(1, len(entry["rewards"]) + 1), entry["rewards"], ".-", lw=0.8, ms=3,
                       label=f"seed {entry['seed']}")
            reward = entry["held_out_uniform"]["top1" if config.startswith("cp") else "loss"]
            curve.axhline(reward if config.startswith("cp") else -reward, color="k", lw=0.8, ls="--")
        curve.axvspan(0.5, warmup + 0.5, color="0.9", zorder=0)
        curve.set_title(f"{config}: roll-out rewards (dashed: uniform)", fontsize=9)
        curve.set_xlabel("roll-out (shaded: random warm-up)")
        curve.set_ylabel("held-out top-1" if config.startswith("cp") else "minus held-out loss")
        curve.legend(fontsize=7)
        for x, (label, group) in enumerate((("uniform", uniform), ("RL", rl))):
            values = [100 * e["top1"] for e in group]
            bars.bar(x, sum(values) / max(len(values), 1), color="C0" if x == 0 else "C1", alpha=0.6)
            bars.plot([x] * len(values), values, "k.", ms=5)
        bars.set_xticks([0, 1], ["uniform", "RL"])
        low = min(100 * e["top1"] for e in uniform + rl)
        bars.set_ylim(max(0, low - 5), min(100, max(100 * e["top1"] for e in uniform + rl) + 2))
        bars.set_ylabel("test top-1 (%) after the learner")
    fig.suptitle(f"DDPG policy search vs uniform, ResNet-56 on the CIFAR-10 subset ({saved['host']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
