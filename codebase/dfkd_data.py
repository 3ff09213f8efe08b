"""The reconstructed dataset of data-free distillation: its shards, their inputs and their files.

A reconstruction of `batches_per_class` batches of `batch` images per class is cut into shards
of `shard_batches` batches per class, optimised one after another (`Reconstruct`, one compiled
step for the whole shard). Inside a shard, image `i` is of class `i % classes`, so every run of
`batch` consecutive images mixes the classes (DeepInversion's batches) and a replica or
micro-batch holds whole batches. Everything a shard starts from (its initial images, the
targets sampled from the teacher's statistics, its dropout masks) comes from the run's seed and
the shard's number alone, so a shard resumed from its checkpoint, or redone, is the same shard.

A finished shard is one `.npz` (`images` in the teacher's normalised input space, `labels`)
written atomically as `<folder>/shard_<k>.npz`; the reconstruction resumes at the first shard
without one. `load_reconstruction` reads a whole folder for distillation, refusing an empty or
partial one with one line naming what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import tensorflow as tf

from codebase import dfkd_stats
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    classes: int
    batch: int
    batches_per_class: int
    shard_batches: int

    @property
    def count(self) -> int:
        return -(-self.batches_per_class // self.shard_batches)

    def size(self, shard: int) -> int:
        """Images of shard `shard` (the last one may hold fewer batches)."""
        batches = min(self.shard_batches, self.batches_per_class - shard * self.shard_batches)
        return self.classes * batches * self.batch

    def labels(self, shard: int) -> np.ndarray:
        return np.arange(self.size(shard)) % self.classes

    @property
    def total(self) -> int:
        return self.classes * self.batches_per_class * self.batch


def shard_path(folder: str, shard: int) -> str:
    return os.path.join(folder, f"shard_{shard:03d}.npz")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def initial_images(n: int, shape, pixel_mean: float, pixel_std: float, data_mean, data_std, seed: int,
                   shard: int) -> np.ndarray:
    """`[n, *shape]` images drawn from N(pixel_mean, pixel_std) in [0, 1] pixel units (the paper:
    N(0.15, 0.1) for MNIST), expressed in the nets' normalised input space."""
    pixels = _rng(seed, shard, 0).normal(pixel_mean, pixel_std, size=(n, *shape))
    mean, std = np.asarray(data_mean, np.float64), np.asarray(data_std, np.float64)
    return ((pixels * 255.0 - mean) / std).astype(np.float32)


class TargetSampler:
    """Samples each image's targets from its class's statistics: `mean + L eps`, `L` the Cholesky
    factor of the class covariance (regularised when singular), computed once per class and
    site and kept for every shard."""

    def __init__(self, stats: dict, what: str):
        self.stats, self.what, self._factors = stats, what, {}

    def _factor(self, key, c):
        if (key, c) not in self._factors:
            self._factors[key, c] = dfkd_stats.cholesky_factor(self.stats[key]["cov"][c], f"{self.what} {key} class {c}")
        return self._factors[key, c]

    def sample(self, labels: np.ndarray, seed: int, shard: int) -> dict:
        out = {}
        for j, (key, entry) in enumerate(self.stats.items()):
            target = np.zeros((len(labels), entry["mean"].shape[1]), np.float32)
            for c in np.unique(labels):
                rows = np.flatnonzero(labels == c)
                seed_c = int(np.random.SeedSequence([int(seed), shard, 1, j, int(c)]).generate_state(1)[0])
                target[rows] = dfkd_stats.sample_targets(entry["mean"][c], self._factor(key, c), len(rows), seed_c)
            out[key] = target
        return out


def dropout_masks(rates: dict, sizes: dict, n: int, seed: int, shard: int) -> dict:
    """`{site: (mask [n, D], keep)}`: a fixed Bernoulli(keep) mask per image and dropped input."""
    rng = _rng(seed, shard, 2)
    return {s: (rng.binomial(1, 1.0 - r, size=(n, sizes[s])).astype(np.float32), 1.0 - r) for s, r in rates.items()}


def index_data_fn(plan: ShardPlan, shard: int, jitter: int, seed: int):
    """The reconstruction's training data: each step, every replica gets the indices and classes
    of its consecutive slice of the shard, and a random shift of up to `jitter` pixels."""
    n = plan.size(shard)
    labels = tf.constant(plan.labels(shard), tf.int64)

    def fn(epoch, ctx):
        per = ctx.get_per_replica_batch_size(n)
        local = (n // per) // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * local

        def element(k):
            start = (first + k % local) * per
            index = tf.cast(start, tf.int64) + tf.range(per, dtype=tf.int64)
            shift = tf.random.stateless_uniform([2], [seed + shard, k + 1_000_003 * epoch], -jitter, jitter + 1,
                                                dtype=tf.int32)
            return index, tf.gather(labels, index), tf.tile(shift[tf.newaxis], [per, 1])

        return tf.data.Dataset.range(2 ** 31).map(element)

    return fn


def save_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, images=np.asarray(images, np.float32), labels=np.asarray(labels, np.int64))
    os.replace(tmp, path)


def load_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: not a reconstructed shard ({type(e).__name__}: {e})") from None
    if images.ndim != 4 or len(images) != len(labels):
        raise ConfigError(f"{path}: a shard holds [n, H, W, C] images and n labels, got {images.shape} and "
                          f"{labels.shape}")
    return images, labels


def load_reconstruction(folder: str, image_shape, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every shard of `folder`, in order; a missing folder, no shard, a gap, or images of another
    shape than the teacher's input are one-line ConfigErrors naming the file."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--dfkd_data {folder}: no such folder")
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard_") and n.endswith(".npz"))
    if not names:
        raise ConfigError(f"{folder}: holds no reconstructed shard (shard_000.npz, ...): reconstruction never finished one")
    expected = [os.path.basename(shard_path(folder, k)) for k in range(len(names))]
    if names != expected:
        gap = next(e for e, n in zip(expected, names) if e != n)
        raise ConfigError(f"{folder}: partial reconstruction: {gap} is missing")
    parts = [load_shard(os.path.join(folder, n)) for n in names]
    for name, (images, labels) in zip(names, parts):
        if tuple(images.shape[1:]) != tuple(image_shape):
            raise ConfigError(f"{os.path.join(folder, name)}: images are {images.shape[1:]}, the teacher takes "
                              f"{tuple(image_shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise ConfigError(f"{os.path.join(folder, name)}: labels outside [0, {classes})")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_data_fn(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """Distillation's data: the reconstructed images, reshuffled every epoch, whole batches."""

    def fn(epoch, ctx):
        per = ctx.get_per_replica_batch_size(batch_size)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.shuffle(len(images), seed=seed * 1000 + epoch, reshuffle_each_iteration=False).batch(
            per, drop_remainder=True)

    return fn
