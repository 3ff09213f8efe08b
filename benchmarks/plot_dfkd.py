"""Reconstructed digits per objective: one row of images per class, a column block per objective.

    python benchmarks/plot_dfkd.py --run top_layer=runs/dfkd/top_layer/1-dfkd/data \\
        --run all_layers=runs/dfkd/all_layers/1-dfkd/data --out docs/figures/dfkd_digits.png

Each `--run NAME=FOLDER` is a reconstruction folder (`shard_*.npz`); the first `--per_class`
images of every class of its first shard are drawn, mapped back from the nets' normalised input
to pixels with MNIST's mean and standard deviation and clipped to [0, 255].
"""

from __future__ import annotations

import argparse
import os

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307 * 255.0, 0.3081 * 255.0


def digits(folder: str, per_class: int, classes: int = 10) -> np.ndarray:
    with np.load(os.path.join(folder, "shard_000.npz"), allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    pixels = np.clip(images[..., 0] * MNIST_STD + MNIST_MEAN, 0, 255)
    return np.stack([pixels[labels == c][:per_class] for c in range(classes)])  # [classes, per_class, H, W]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=FOLDER of shard_*.npz")
    parser.add_argument("--per_class", type=int, default=4)
    parser.add_argument("--out", default="docs/figures/dfkd_digits.png")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r.split("=", 1) for r in args.run]
    grids = [digits(folder, args.per_class) for _, folder in runs]
    fig, axes = plt.subplots(1, len(runs), figsize=(2.2 * len(runs) * args.per_class / 4, 5.5))
    for ax, (name, _), grid in zip(np.atleast_1d(axes), runs, grids):
        c, k, h, w = grid.shape
        ax.imshow(grid.transpose(0, 2, 1, 3).reshape(c * h, k * w), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=10)
        ax.set_yticks([h * (i + 0.5) for i in range(c)], [str(i) for i in range(c)])
        ax.set_xticks([])
    fig.suptitle("Reconstructed MNIST digits (one row per class)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
