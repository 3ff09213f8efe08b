"""What channel pruning measures: per channel group, the statistics of its readers' reconstruction.

He et al. (2017) prune a convolution's *input* channels: sample the conv's input patches X and its
output Y at random positions, choose the channels whose contributions `X_i W_i` best rebuild Y
(LASSO, `codebase.lasso`), refit the kept weights by least squares, and drop the matching output
channels of the layer that wrote them. Here the unit is a channel group (`nets.groups`), so one
choice is made for every reader of a group at once:

* a group read by one conv (a ResNet block's inner channels, a MobileNetV2 expansion through its
  depthwise conv) has one reconstruction problem, that conv's;
* a residual stream is read by every conv of its stage (each block's first conv, the next stage's
  projection) and by every identity shortcut. Its problem is the sum of all of them, each as a
  mean over its own samples: the convs' outputs, and, for an identity shortcut, the stream itself
  (channel i contributes only to itself), so a stream channel counts by what the convs need from
  it and by the signal it carries down the shortcuts.

Groups read by a dense layer (the classifier, a flattened map) are not pruned, as in PocketFlow.

Everything is accumulated over batches from one traced forward pass per net (`Record` taps on the
`layer_in` / `layer_out` / `block` sites; the net runs only as far as its last needed site): per
conv reader the channel Gram `G = Z Z^T / M` and `b = Z y / M` of the LASSO, and the normal equations `X^T X`, `X^T Y` of the least squares; no
sample matrix is ever stored. Positions are drawn by a stateless generator from (seed, batch), so
a resumed run draws the same ones. `x_net` gives the inputs and `y_net` the targets: the same net
for `cp`, the pruned and the full net for `cpr` (compensating the error accumulated upstream).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import tensorflow as tf

from nets.layers import Conv2d
from nets.sites import Record
from op_utils.traced import fresh_function
from utils.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Problem:
    """One channel group to prune and who reads it.

    Attributes:
        group: the group's key.
        convs: keys of the convs reading the group (their input group; not a depthwise conv,
            which is part of the group).
        shortcuts: names of the block sites whose value an identity shortcut carries on.
        writers: keys of the layers writing the group (its output group; not BN or depthwise).
    """

    group: str
    convs: tuple
    shortcuts: tuple = ()
    writers: tuple = ()

    @property
    def stream(self) -> bool:
        """A residual stream: written by several layers, or carried on by a shortcut."""
        return bool(self.shortcuts) or len(self.writers) > 1


def problems(net, streams: bool = True) -> list:
    """The groups channel pruning can choose for `net`, in network order (by their first reader);
    without `streams`, the residual streams are left out (PocketFlow pruned inside blocks only)."""
    sites = net.sites()
    order = {site.layer.key: i for i, site in enumerate(sites) if site.kind == "layer_in"}
    blocks = [site for site in sites if site.kind == "block"]
    readers: dict = {}
    writers: dict = {}
    for layer in net.layers.values():
        group = getattr(layer, "in_group", None)
        if group is None or getattr(layer, "out_group", None) is group:  # BN, depthwise: inside the group
            continue
        readers.setdefault(group.key, []).append(layer)
        writers.setdefault(layer.out_group.key, []).append(layer.key)
    shortcuts: dict = {}
    for before, after in zip(blocks, blocks[1:]):
        if before.group is after.group:  # the channels pass through the block: an identity shortcut
            shortcuts.setdefault(before.group.key, []).append(before.name)
    found = []
    for key, group in net.prunable_groups().items():
        layers = readers.get(key, [])
        if not layers or not all(isinstance(layer, Conv2d) for layer in layers):
            continue
        layers.sort(key=lambda layer: order[layer.key])
        found.append(Problem(key, tuple(layer.key for layer in layers), tuple(shortcuts.get(key, ())),
                             tuple(writers.get(key, ()))))
    found = [p for p in found if streams or not p.stream]
    found.sort(key=lambda p: order[p.convs[0]])
    if not found:
        raise ConfigError(f"{net.arch} has no channel group read only by convolutions: nothing for channel "
                          "pruning to choose")
    return found


@dataclasses.dataclass
class ConvStats:
    """Sums over the samples of one conv reader (float64; `count` positions)."""

    gram: np.ndarray  # [c_in, c_in]: sum_n,o Z_i Z_j
    lin: np.ndarray  # [c_in]: sum_n,o Z_i y
    xx: np.ndarray  # [kh*kw*c_in, kh*kw*c_in], rows in (kh, kw, c_in) order
    xy: np.ndarray  # [kh*kw*c_in, c_out]
    yy: float
    count: int
    c_out: int


@dataclasses.dataclass
class GroupStats:
    """What `select` and `refit` need for one group."""

    convs: dict  # conv key -> ConvStats
    shortcut_gram: np.ndarray  # [c] diagonal: sum of x_i^2 over every identity shortcut's samples
    shortcut_lin: np.ndarray  # [c]: sum of x_i * y_i
    shortcut_count: int  # samples times shortcuts

    def lasso_terms(self) -> tuple:
        """`(G, b)` of the group's LASSO: every reader's mean over its own samples, summed."""
        size = len(self.shortcut_gram)
        gram, lin = np.zeros([size, size]), np.zeros(size)
        for stats in self.convs.values():
            m = stats.count * stats.c_out
            gram += stats.gram / m
            lin += stats.lin / m
        if self.shortcut_count:
            m = self.shortcut_count * size
            gram += np.diag(self.shortcut_gram / m)
            lin += self.shortcut_lin / m
        return gram, lin


def _positions(seed: int, salt: str, batch_index, shape, points: int):
    """[b, points, 2] output positions of one conv, fixed by (seed, conv, batch)."""
    stream = zlib.crc32(salt.encode()) & 0x7FFFFFFF
    s = tf.stack([tf.constant(seed, tf.int64) * 1000003 + stream, tf.cast(batch_index, tf.int64)])
    b, h, w = shape
    rows = tf.random.stateless_uniform([b, points], s, 0, h, tf.int32)
    cols = tf.random.stateless_uniform([b, points], s + [0, 1 << 40], 0, w, tf.int32)
    return tf.stack([rows, cols], -1)


def _pads(conv: Conv2d, in_hw, out_hw) -> list:
    """[[top, bottom], [left, right]] of the conv's padding."""
    if isinstance(conv.padding, str):
        if conv.padding == "VALID":
            return [[0, 0], [0, 0]]
        pads = []
        for size, out, k in zip(in_hw, out_hw, conv.kernel_size):
            total = max((out - 1) * conv.strides + k - size, 0)
            pads.append([total // 2, total - total // 2])
        return pads
    return [list(p) for p in conv.padding[1:3]]


def patches_at(conv: Conv2d, x, y_shape, positions):
    """The conv's input patches at output `positions`: [b, p, kh, kw, c_in]."""
    kh, kw = conv.kernel_size
    pads = _pads(conv, x.shape[1:3], y_shape[1:3])
    x = tf.pad(x, [[0, 0], *pads, [0, 0]])
    s = conv.strides
    rows = positions[..., 0:1] * s + tf.range(kh)  # [b, p, kh]
    cols = positions[..., 1:2] * s + tf.range(kw)  # [b, p, kw]
    b, p = tf.shape(positions)[0], tf.shape(positions)[1]
    batch = tf.broadcast_to(tf.range(b)[:, None, None, None], [b, p, kh, kw])
    index = tf.stack([batch, tf.broadcast_to(rows[..., :, None], [b, p, kh, kw]),
                      tf.broadcast_to(cols[..., None, :], [b, p, kh, kw])], -1)
    return tf.gather_nd(x, index)


def values_at(y, positions):
    """`y[b, h, w, :]` at `positions`: [b, p, c]."""
    b, p = tf.shape(positions)[0], tf.shape(positions)[1]
    batch = tf.broadcast_to(tf.range(b)[:, None], [b, p])
    return tf.gather_nd(y, tf.stack([batch, positions[..., 0], positions[..., 1]], -1))


class Sampler:
    """Accumulates `GroupStats` for problems, reading inputs from `x_net` and targets from `y_net`.

    Args:
        x_net, y_net: nets of the same architecture (the same object for `cp`); masked ones are
            run with their masks. Both run with `training=False`.
        points: sampled output positions per image and conv.
        seed: fixes the positions.
    """

    def __init__(self, x_net, y_net, points: int, seed: int):
        self.x_net, self.y_net, self.points, self.seed = x_net, y_net, int(points), int(seed)

    def _sites(self, chosen):
        x_names, y_names = set(), set()
        for problem in chosen:
            for key in problem.convs:
                x_names.add(f"{key}:in")
                y_names.add(f"{key}:out")
            x_names.update(problem.shortcuts)
            y_names.update(problem.shortcuts)
        return sorted(x_names), sorted(y_names)

    def collect(self, chosen: list, batches) -> dict:
        """`{group key: GroupStats}` of the `chosen` problems over the image `batches` (numpy)."""
        x_names, y_names = self._sites(chosen)
        layers = self.x_net.layers
        same = self.x_net is self.y_net

        def record(net, names, images):
            """The sites `names` of `net` on `images`; the net runs only as far as the last of them."""
            taken = Record(names)
            net.forward_until(images, lambda: len(taken.values) == len(names), training=False, tap=taken)
            return taken.values

        def step(images, index):
            if same:
                xs = ys = record(self.x_net, sorted(set(x_names) | set(y_names)), images)
            else:
                xs, ys = record(self.x_net, x_names, images), record(self.y_net, y_names, images)
            out = {}
            for problem in chosen:
                for key in problem.convs:
                    conv = layers[key]
                    x, y = xs[f"{key}:in"], ys[f"{key}:out"]
                    b = tf.shape(x)[0]
                    pos = _positions(self.seed, key, index, [b, tf.shape(y)[1], tf.shape(y)[2]], self.points)
                    patches = patches_at(conv, x, y.shape, pos)  # [b, p, kh, kw, c]
                    target = values_at(y, pos)  # [b, p, c_out]
                    kh, kw = conv.kernel_size
                    c = patches.shape[-1]
                    flat = tf.reshape(patches, [-1, kh * kw * c])
                    target = tf.reshape(target, [-1, target.shape[-1]])
                    # The kernel as the masked forward pass uses it: pruned rows and columns are zero.
                    contrib = tf.einsum("npqc,pqco->nco", tf.reshape(patches, [-1, kh, kw, c]), conv.param("kernel"))
                    out[key] = dict(gram=tf.einsum("nco,ndo->cd", contrib, contrib),
                                    lin=tf.einsum("nco,no->c", contrib, target),
                                    xx=tf.matmul(flat, flat, transpose_a=True),
                                    xy=tf.matmul(flat, target, transpose_a=True),
                                    yy=tf.reduce_sum(tf.square(target)), count=tf.shape(flat)[0])
                for name in problem.shortcuts:
                    x, y = xs[name], ys[name]
                    b = tf.shape(x)[0]
                    pos = _positions(self.seed, name, index, [b, tf.shape(x)[1], tf.shape(x)[2]], self.points)
                    xv = tf.reshape(values_at(x, pos), [-1, x.shape[-1]])
                    yv = tf.reshape(values_at(y, pos), [-1, y.shape[-1]])
                    out[name] = dict(gram=tf.reduce_sum(tf.square(xv), 0), lin=tf.reduce_sum(xv * yv, 0),
                                     count=tf.shape(xv)[0])
            return out

        step = fresh_function(step, reduce_retracing=True)
        sums: dict = {}
        for index, images in enumerate(batches):
            for key, parts in step(tf.constant(images), tf.constant(index, tf.int64)).items():
                into = sums.setdefault(key, {})
                for name, value in parts.items():
                    value = np.asarray(value.numpy(), np.float64) if name != "count" else int(value.numpy())
                    into[name] = into.get(name, 0) + value
        if not sums:
            raise ConfigError("channel pruning got no training images to sample")
        stats = {}
        for problem in chosen:
            convs = {key: ConvStats(c_out=layers[key].out_group.size, **sums[key]) for key in problem.convs}
            size = layers[problem.convs[0]].in_group.size
            gram, lin, count = np.zeros(size), np.zeros(size), 0
            for name in problem.shortcuts:
                gram, lin, count = gram + sums[name]["gram"], lin + sums[name]["lin"], count + sums[name]["count"]
            stats[problem.group] = GroupStats(convs, gram, lin, count)
        return stats
