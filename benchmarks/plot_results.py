"""Accuracy against FLOPs and against wall time, for every method in the benchmark results files.

Reads every `benchmarks/results/*.json` (each: `{"benchmark", "figure"?, "unpruned", "runs": [{"label",
"seed", "top1", "flops_rate", "wall_s"?}]}`, written by the benchmark scripts or transcribed from
earlier sessions' tables; files of the same benchmark share one figure), groups runs by benchmark
and label, and draws one figure per benchmark: top-1 (mean and sample standard deviation over
seeds, each seed a small dot) against the fraction of the FLOPs kept (EKG convention), and against
the wall time of a run where it was recorded.

    python benchmarks/plot_results.py                       # -> docs/figures/<benchmark>.png
    python benchmarks/plot_results.py --results benchmarks/results --out docs/figures

Needs matplotlib (a benchmark-only dependency: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(folder: str) -> dict:
    """`{benchmark title: {"unpruned": ..., "runs": [...]}}` merged over the files of `folder`."""
    merged: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        entry = merged.setdefault(data["benchmark"], {"unpruned": data.get("unpruned"), "runs": [],
                                                      "figure": data.get("figure")})
        entry["figure"] = entry["figure"] or data.get("figure")
        entry["runs"] += data["runs"]
        entry["unpruned"] = entry["unpruned"] or data.get("unpruned")
    return merged


def groups(runs: list) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(run["label"], []).append(run)
    return out


def _mean_sd(values):
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def draw(title: str, entry: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = groups(entry["runs"])
    timed = {k: [r for r in v if "wall_s" in r] for k, v in by_label.items()}
    panels = 2 if any(timed.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    for i, (label, runs) in enumerate(by_label.items()):
        style = dict(color=colours[i % len(colours)], marker=markers[i % len(markers)])
        top1 = [100 * r["top1"] for r in runs]
        flops = [100 * r["flops_rate"] for r in runs]
        (m, s), (fm, _) = _mean_sd(top1), _mean_sd(flops)
        ax = axes[0][0]
        ax.scatter(flops, top1, s=10, alpha=0.35, color=style["color"])
        ax.errorbar([fm], [m], yerr=[s], capsize=3, markersize=7, linestyle="none",
                    label=f"{label} ({m:.1f} ± {s:.1f}, n={len(runs)})", **style)
        if panels == 2 and timed[label]:
            wall = [r["wall_s"] / 60 for r in timed[label]]
            acc = [100 * r["top1"] for r in timed[label]]
            (wm, ws), (am, asd) = _mean_sd(wall), _mean_sd(acc)
            ax2 = axes[0][1]
            ax2.scatter(wall, acc, s=10, alpha=0.35, color=style["color"])
            ax2.errorbar([wm], [am], xerr=[ws], yerr=[asd], capsize=3, markersize=7, linestyle="none", **style)
    unpruned = entry.get("unpruned")
    lowest = min(100 * r["flops_rate"] for r in entry["runs"])
    if unpruned:
        point = (100 * unpruned.get("flops_rate", 1.0), 100 * unpruned["top1"])
        axes[0][0].axhline(point[1], color="grey", linestyle="--", linewidth=1)
        axes[0][0].scatter(*point, marker="*", s=120, color="black", zorder=3,
                           label=f"{unpruned['label']} ({point[1]:.1f})")
    # The whole range from the most pruned net to the unpruned one, so distances read as FLOPs.
    axes[0][0].set_xlim(max(0.0, lowest - 8), 103)
    axes[0][0].set_xlabel("FLOPs kept, % of the unpruned net (EKG convention)")
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    axes[0][0].grid(alpha=0.3)
    if panels == 2:
        axes[0][1].set_xlabel("wall time of a run (minutes, 2-core CPU; host in the results file)")
        axes[0][1].set_ylabel("top-1 (%)")
        axes[0][1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower().split(",")[0]).strip("_")[:60]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(_ROOT, "benchmarks", "results"))
    parser.add_argument("--out", default=os.path.join(_ROOT, "docs", "figures"))
    args = parser.parse_args(argv)
    for title, entry in load(args.results).items():
        path = os.path.join(args.out, f"{entry['figure'] or slug(title)}.png")
        draw(title, entry, path)
        print(path)


if __name__ == "__main__":
    main()
