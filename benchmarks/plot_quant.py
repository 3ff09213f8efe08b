"""The quantization and sparsity benchmark as a figure: top-1 against stored size, and against sparsity.

Left: every QAT row of `quant_cifar.py` (ResNet-20A), top-1 against the size of its packed params
file (mean +- sd over seeds), PocketFlow's top-1 for the same row as a cross at the same size
(its own files stored floats), and the float pickle. Right: top-1 against weight
sparsity for the toolkit's `ws` and TF-MOT's `prune_low_magnitude` (`tfmot_sparsity.py`) on the
same nets, budget and recipe.

    python benchmarks/plot_quant.py   # reads benchmarks/results/quant/*.json -> docs/figures/cifar_10_quant.png

Needs matplotlib (a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mean_sd(values):
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(_ROOT, "benchmarks", "results", "quant"))
    parser.add_argument("--out", default=os.path.join(_ROOT, "docs", "figures", "cifar_10_quant.png"))
    args = parser.parse_args(argv)
    with open(os.path.join(args.results, "quant_cifar.json")) as f:
        ours = json.load(f)
    with open(os.path.join(args.results, "tfmot_sparsity.json")) as f:
        peer = json.load(f)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = {}
    for run in ours["runs"]:
        rows.setdefault(run["row"], []).append(run)
    for row, runs in rows.items():
        if row.startswith("ws") or not runs[0].get("packed_bytes"):
            continue
        mean, sd = _mean_sd(100 * r["top1"] for r in runs)
        size = runs[0]["packed_bytes"] / 1024
        line = left.errorbar([size], [mean], yerr=[sd], fmt="o", capsize=3)
        left.annotate(row, (size, mean), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if row in ours.get("pocketflow", {}):  # PocketFlow's top-1 for the row, at the size it would pack to
            left.plot([size], [ours["pocketflow"][row]], marker="x", color=line[0].get_color(), alpha=0.6)
    fp = [r for r in ours["runs"] if r["row"] == "fp_ft"]
    if fp:
        float_kb = next((r["float_bytes"] for r in ours["runs"] if r.get("float_bytes")), 0) / 1024
        left.errorbar([float_kb], [_mean_sd(100 * r["top1"] for r in fp)[0]], fmt="s", color="black")
        left.annotate("fp_ft (float pickle)", (float_kb, 100 * fp[0]["top1"]), textcoords="offset points",
                      xytext=(-60, 6), fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("packed params file (KB, log); x: PocketFlow's top-1 for the row")
    left.set_ylabel("top-1 on the 1,017 real test images (%)")
    left.set_title("ResNet-20A QAT rows (uq, nuq)", fontsize=10)
    left.grid(alpha=0.3)

    for name, runs, style in (("toolkit ws", [r for r in ours["runs"] if r["row"].startswith("ws")], "-o"),
                              ("TF-MOT prune_low_magnitude", [r for r in peer["runs"] if r["sparsity"] > 0], "--s")):
        for depth in ("20", "56"):
            chosen = [r for r in runs if ("ws" + depth) in r.get("row", "") or r.get("arch") == f"ResNet-{depth}"]
            if not chosen:
                continue
            by = {}
            for r in chosen:
                sparsity = r["sparsity"] if "sparsity" in r and r["sparsity"] is not None else 0
                by.setdefault(round(sparsity, 2), []).append(100 * r["top1"])
            xs = sorted(by)
            stats = [_mean_sd(by[x]) for x in xs]
            right.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3,
                           label=f"{name}, ResNet-{depth}")
    right.set_xlabel("weight sparsity of the conv and dense kernels")
    right.set_ylabel("top-1 (%)")
    right.set_title("weight sparsity, same nets, budget and recipe", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"Real CIFAR-10 (5,085 training images), option-A weights; {ours.get('host', '')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
