"""Shunt connections at a glance: every block's knowledge quotient, with the shunted runs marked, and
top-1 against FLOPs of the original, the shunt-inserted and the final nets.

    python benchmarks/plot_shunt.py --bench ResNet-56=runs/shunt_r56/results.json \\
        --bench MobileNetV2=runs/shunt_mbv2/results.json --point "ResNet-56 L1=runs/r56_l1/results.json" \\
        --out docs/figures/shunt.png

Each `--bench NAME=FILE` is a `shunt_cifar.py` results file (one row of the figure: its quotients, from
its first run, and its configurations' mean top-1 against the FLOPs kept); `--point LABEL=FILE` adds a
`train_cifar.py` run's `results.json` (a baseline at the same FLOPs) to the row whose name starts its
label. Needs matplotlib (a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics

import nets


def pairs(values):
    out = []
    for value in values or ():
        name, _, path = value.partition("=")
        with open(path) as f:
            out.append((name, json.load(f)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="append", required=True, help="NAME=shunt_cifar.py results.json")
    parser.add_argument("--point", action="append", help="LABEL=train_cifar.py results.json (a baseline)")
    parser.add_argument("--out", default="docs/figures/shunt.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches, points = pairs(args.bench), pairs(args.point)
    fig, axes = plt.subplots(len(benches), 2, figsize=(13, 3.6 * len(benches)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    for (name, saved), (left, right) in zip(benches, axes):
        runs = saved["runs"]
        quotients = runs[0]["quotients"]["blocks"]
        order = [b.name for b in nets.build(saved["budget"]["arch"], masked=False).block_table]
        heights = [100 * quotients[n]["kq"] if n in quotients else 0.0 for n in order]
        left.bar(range(len(order)), heights, color="tab:blue")
        for n in order:
            if n not in quotients:  # changes the shape: no quotient
                left.scatter([order.index(n)], [0], marker="|", color="gray", s=80)
        for shunts in {tuple((s["first"], s["last"]) for s in r["shunts"]) for r in runs}:
            for first, last in shunts:
                left.axvspan(order.index(first) - 0.45, order.index(last) + 0.45, color="tab:red", alpha=0.12)
        left.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
        left.set_ylabel("knowledge quotient (%)")
        runs_text = "; ".join(sorted({", ".join(f"{s['first']}..{s['last']}" for s in r["shunts"]) for r in runs}))
        left.set_title(f"{name}: knowledge quotients on the validation split (|: no quotient, the block changes "
                       f"the shape)\nshaded: shunted runs ({runs_text})", fontsize=9)
        original = runs[0]["top1"]["original"]
        right.scatter([100], [100 * original], color="black", marker="*", s=120, label="original", zorder=3)
        for config in dict.fromkeys(r["config"] for r in runs):
            group = [r for r in runs if r["config"] == config]
            kept = 100 * (1 - statistics.mean(r["flops_cut"] for r in group))
            final = [100 * r["top1"]["final"] for r in group]
            inserted = 100 * statistics.mean(r["top1"]["shunt_inserted"] for r in group)
            line = right.errorbar([kept], [statistics.mean(final)], yerr=[statistics.pstdev(final)], fmt="o",
                                  capsize=3, label=f"{config} (n={len(group)})")
            right.scatter([kept], [inserted], marker="x", color=line[0].get_color())
        for label, results in points:
            if label.startswith(name):
                right.scatter([100 * results["ekg_flops"] / results["full_ekg_flops"]], [100 * results["top1"]],
                              marker="s", label=label[len(name):].strip() or label, zorder=3)
        right.set_xlabel("FLOPs kept (% of the original, EKG convention)")
        right.set_ylabel("top-1 on the test images (%)")
        right.set_title("o: final nets (mean +- sd over seeds); x: shunt inserted",
                        fontsize=9)
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
