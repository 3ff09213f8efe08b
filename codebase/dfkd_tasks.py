"""Dataset reconstruction for data-free distillation: a task whose trained variables are images.

`Reconstruct` optimises one shard of synthetic images against a frozen teacher (Lopes et al.
2017; DeepInversion, Yin et al. 2020). The images are one variable `[n, H, W, C]` in the
teacher's normalised input space; a training batch carries image *indices* (and their classes),
so the engine splits a shard over replicas and micro-batches like any batch and the gradients
flow through `tf.gather` into the rows of the images it holds. The teacher gets no update of
any kind: it is not among the trained variables.

Each image stands for one image of the original's batches of `reference_batch` (64 in the
paper, 256 in DeepInversion): its loss is scaled so that its gradient is exactly the gradient
of its batch's mean objective, and Adam is element-wise, so optimising the whole shard in one
compiled step is optimising every batch on its own, only faster.

Objectives (per image; `relu` on both sides as in the original; `s_l` the recorded
pre-activations of layer `l` of `D_l` units, flattened channel-last, logits divided by T):

* `top_layer`: `mean((relu(t_top) - relu(z / T))^2)`;
* `all_layers`: `sum_l (1 / D_l) mean((relu(t_l) - relu(s_l))^2)`;
* `all_layers_dropout`: `all_layers` with a fixed dropout mask per image on every input the
  teacher drops in training (inverted dropout, as the teacher was trained);
* `spectral_all_layers`, `spectral_layer_pairs`: `sum_g (1 / k_g) mean((c_g - U_g^T s_g)^2)`
  over the graphs `g` of `codebase.dfkd_stats` (one for the whole net, or one per pair of
  adjacent layers), `s_g` their sites' values concatenated;
* `bn_stats` (DeepInversion, no metadata): per batch of `reference_batch` images,
  `CE(teacher(x), class) + bn * sum_BN (||mu_B - mu_run|| + ||var_B - var_run||) + tv * TV(x)
  + l2 * ||x||`, on the image rolled by a random shift of up to `jitter` pixels each step.

The targets `t` (one sample per image from its class's statistics) and dropout masks are
drawn once per shard from a seed by `codebase.methods.dfkd` and held as non-trainable
variables, so a resumed shard continues the same optimisation.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from nets.layers import BatchNorm
from nets.sites import Record, Replace, chain
from op_utils.task import LossOut, Task

OBJECTIVES = ("top_layer", "all_layers", "all_layers_dropout", "spectral_all_layers", "spectral_layer_pairs",
              "bn_stats")
SPECTRAL = {"spectral_all_layers": "all_layers", "spectral_layer_pairs": "layer_pairs"}


@dataclasses.dataclass(frozen=True)
class Priors:
    """`bn_stats`' weights (DeepInversion's CIFAR-10 defaults) and the per-step jitter."""

    bn: float = 10.0
    ce: float = 1.0
    tv: float = 2.5e-5
    l2: float = 0.0
    jitter: int = 0


def _norm(x, axes):
    """L2 norm over `axes` with a finite gradient at zero."""
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes) + 1e-12)


def _flat(x):
    return tf.reshape(x, [tf.shape(x)[0], -1])


class Reconstruct(Task):
    """Optimise a shard of images against `teacher` (see the module docstring).

    Args:
        teacher: the frozen classifier, called as `teacher(x, training=False, tap=...)`.
        images: `[n, H, W, C]` initial images (normalised input space).
        objective: one of `OBJECTIVES`.
        reference_batch: images per batch of the original's optimisation (the scale of the
            gradient, and `bn_stats`' statistics group: a micro-batch holds whole groups).
        temperature: T dividing the logits (the statistics' T).
        sites: the recorded sites in forward order (the last is the logits).
        layer_targets: `{site: [n, D]}` sampled targets (`top_layer`, `all_layers*`).
        spectral: `{graph: (sites, basis [D_g, k], targets [n, k])}` (spectral objectives).
        dropout: `{layer_in site: [n, D] 0/1 mask, keep}` as `{site: (mask, keep)}`.
        priors: `bn_stats`' weights and the jitter.
    """

    def __init__(self, teacher, images: np.ndarray, objective: str, reference_batch: int, temperature: float = 1.0,
                 sites=(), layer_targets: Mapping | None = None, spectral: Mapping | None = None,
                 dropout: Mapping | None = None, priors: Priors = Priors()):
        super().__init__(name="reconstruct")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        self.teacher, self.objective, self.priors = teacher, objective, priors
        self.reference_batch, self.temperature = int(reference_batch), float(temperature)
        self.scale = images.shape[0] / self.reference_batch
        self.sites = list(sites)
        self.images = tf.Variable(np.asarray(images, np.float32), name="images")

        def constant(name, value):
            return tf.Variable(np.asarray(value, np.float32), trainable=False, name=name)

        # The layer objectives compare relu(t): fixed targets, so rectified once here.
        self.layer_targets = {s: constant("target", np.maximum(t, 0.0)) for s, t in (layer_targets or {}).items()}
        self.spectral = {g: (list(s), constant("basis", u), constant("target", t))
                         for g, (s, u, t) in (spectral or {}).items()}
        self.dropout = {s: (constant("mask", m / keep)) for s, (m, keep) in (dropout or {}).items()}
        self.bn_layers = [layer for layer in teacher.layers.values() if isinstance(layer, BatchNorm)]
        if objective == "bn_stats" and not self.bn_layers:
            raise ValueError(f"{teacher.arch} has no BatchNorm layer: bn_stats needs one")

    def variables_to_train(self):
        return [self.images]

    def checkpoint_items(self):
        return {"images": self.images}

    def loss(self, batch, training):
        del training  # the teacher always runs in inference mode
        index, labels = batch[0], tf.cast(tf.reshape(batch[1], [-1]), tf.int32)
        x = tf.gather(self.images, index)
        if self.priors.jitter and len(batch) > 2:
            x = tf.roll(x, shift=batch[2][0], axis=[1, 2])
        record = Record(lambda site: site.name in self.sites or self._is_bn_input(site))
        replace = Replace({s: (lambda v, m=m: v * tf.gather(m, index)) for s, m in self.dropout.items()})
        logits = self.teacher(x, training=False, tap=chain(replace, record))
        values = {s: _flat(record.values[s]) for s in self.sites}
        if self.sites:
            values[self.sites[-1]] = values[self.sites[-1]] / self.temperature
        extras = {}
        if self.objective == "bn_stats":
            objective, extras = self._bn_stats(x, logits, labels, record)
        elif self.objective in SPECTRAL:
            objective = tf.add_n([self._spectral(graph, values, index) for graph in self.spectral])
        else:
            sites = self.sites[-1:] if self.objective == "top_layer" else self.sites
            weights = [1.0] if self.objective == "top_layer" else [1.0 / self._size(s) for s in sites]
            objective = tf.add_n([w * tf.reduce_mean(tf.square(tf.gather(self.layer_targets[s], index)
                                                               - tf.nn.relu(values[s])), axis=1)
                                  for w, s in zip(weights, sites)])
        return LossOut(self.scale * objective, {"objective": objective, **extras}, logits, labels)

    def _size(self, site) -> int:
        return int(self.layer_targets[site].shape[1])

    def _spectral(self, graph, values, index):
        sites, basis, targets = self.spectral[graph]
        signal = tf.concat([values[s] for s in sites], axis=1)
        coefficients = tf.matmul(signal, basis)
        return tf.reduce_mean(tf.square(tf.gather(targets, index) - coefficients), axis=1) / float(basis.shape[1])

    @staticmethod
    def _is_bn_input(site) -> bool:
        return site.kind == "layer_in" and isinstance(site.layer, BatchNorm)

    def _bn_stats(self, x, logits, labels, record):
        """Per image: its CE plus its batch's BN, TV and L2 terms (each batch's mean is its loss)."""
        b, size = tf.shape(x)[0], self.reference_batch
        groups = b // size

        def per_group(v):  # [groups] -> [b]: every image of a batch carries its batch's term
            return tf.repeat(v, size)

        bn = 0.0
        for site_name, value in record.values.items():
            site = record.sites[site_name]
            if not self._is_bn_input(site):
                continue
            v = tf.reshape(value, [groups, -1, value.shape[-1]])
            mean, var = tf.nn.moments(v, axes=[1])
            layer = site.layer
            stored_mean, stored_var = tf.reshape(layer.moving_mean, [-1]), tf.reshape(layer.moving_variance, [-1])
            bn += _norm(mean - stored_mean, [1]) + _norm(var - stored_var, [1])
        g = tf.reshape(x, [groups, size, *x.shape[1:]])
        tv = (_norm(g[:, :, :, :-1] - g[:, :, :, 1:], [1, 2, 3, 4]) + _norm(g[:, :, :-1] - g[:, :, 1:], [1, 2, 3, 4])
              + _norm(g[:, :, 1:, :-1] - g[:, :, :-1, 1:], [1, 2, 3, 4])
              + _norm(g[:, :, :-1, :-1] - g[:, :, 1:, 1:], [1, 2, 3, 4]))
        l2 = _norm(g, [1, 2, 3, 4])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))
        p = self.priors
        objective = p.ce * ce + per_group(p.bn * bn + p.tv * tv + p.l2 * l2)
        return objective, {"ce": ce, "bn": per_group(bn), "tv": per_group(tv)}
