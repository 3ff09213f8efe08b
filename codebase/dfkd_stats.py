"""The activation statistics of data-free knowledge distillation (Lopes, Fenu & Starner, 2017).

Data-free KD ships a teacher with metadata recorded once on its training data; a student is
later distilled on inputs optimised until the teacher's activations match targets drawn from
that metadata. This module records the metadata, saves and loads it, and draws the targets.

What is recorded
----------------
Sites (`record_sites`): the output `<key>:out` (a `layer_out` site, `nets.sites`) of every conv,
depthwise conv and dense layer, in forward order: the pre-activations the paper records (in a
net with BatchNorm, the conv's output before its BN). The last one is the logits, which are
divided by the temperature T (the paper: T = 8) before anything is computed from them.

* Layer statistics (`layer_statistics`): per site and per class, over the examples of that
  class, with the site's tensor flattened per example in channel-last order: the count, the
  mean, the population covariance (divided by n, as the original) and the standard deviation
  (the square root of its diagonal), and the per-example shape of the site. They are
  accumulated in float64 with Chan et al.'s parallel update (`ClassMoments`) and returned as
  float32. Memory: a covariance is D x D per class; LeNet-5's conv1 at 28x28 has D = 4704
  units, 177 MB a class in float64 while accumulating (1.8 GB for 10 classes), 89 MB a class
  in float32 in the file.

* Spectral statistics (`spectral_statistics`; the paper's `spectral_all_layers` and
  `spectral_layer_pairs`, whose code in the original repository is broken, so this is our
  definition). The net is a graph: its vertices are the units of the recorded sites, and the
  weight of the edge between unit i of a site a and unit j of the next site b is the absolute
  linear connection strength `A[i, j]` (`pair_adjacency`): the value of b_j when a holds the
  one-hot e_i and the part of the net between a and b runs with every kernel and BN scale
  replaced by its absolute value and every bias, BN shift and BN moving mean set to 0 (so a BN
  scales by |gamma| / sqrt(var + eps)). Weights and input are then non-negative, so ReLU and
  max-pooling pass the one-hot's image unchanged, and the map is exactly the layer's absolute
  connection pattern, strides, padding, pooling and flattening included. A graph over sites
  s_1..s_m has the symmetric block tri-diagonal adjacency W with blocks A_(t,t+1) and their
  transposes, and the Laplacian L = D - W (D: the degrees). Its basis U (`graph_basis`) is the
  k = max(1, round(fraction * D_total)) eigenvectors of the smallest eigenvalues (the smoothest
  signals on the graph), each signed so that its largest-magnitude entry is positive (the first
  of them where magnitudes tie within a relative 1e-6, as they do on a symmetric graph; a basis
  is unique only up to rotation within a repeated eigenvalue). The statistics are the per-class moments, as
  above, of the coefficients `U^T s`, s the concatenation of the graph's sites' flattened
  values (pre-activations, logits / T). Mode `all_layers`: one graph over all sites, named
  `all`; mode `layer_pairs`: one graph per consecutive pair, named `<a>|<b>`. Cost: the
  Laplacian is dense (float64) and `scipy.linalg.eigh` dominates: LeNet-5 at 32x32 (SAME conv1,
  8662 units, k = 866) takes about 2 minutes on 2 shared cores, the pair adjacencies 1 s.

File format (`save_stats`, `load_stats`)
----------------------------------------
One `.npz` of plain arrays (read with `allow_pickle=False`), written atomically:

* `meta`: a 0-d string array holding JSON: `{"format": 1, "spec": teacher.spec(),
  "sites": [...], "temperature": T, "spectral": {graph name: [its sites]} or null}`;
* `layer/<site>/<field>` for field in mean [C, D], std [C, D], cov [C, D, D] (float32),
  count [C] (int64), shape (int64, the per-example shape);
* `spectral/<graph name>/<field>` for field in basis [D_total, k], eigenvalues [k], mean [C, k],
  std [C, k], cov [C, k, k] (float32), count [C] (int64).

Sampling
--------
`cholesky_factor` and `sample_targets` draw targets `mean + L eps`, eps ~ N(0, I), L the
Cholesky factor of the covariance: their covariance is the recorded one. The original code
multiplied eps by the covariance itself (targets of covariance Sigma^2): a bug fixed here.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np
import tensorflow as tf

from nets.layers import FC, Conv2d, DepthwiseConv2d
from nets.sites import Record
from op_utils.traced import fresh_function
from utils.atomic import atomic_open
from utils.errors import ConfigError
from utils.logs import get_logger

FORMAT = 1
MODES = ("all_layers", "layer_pairs")
LAYER_FIELDS = ("mean", "std", "cov", "count", "shape")
SPECTRAL_FIELDS = ("basis", "eigenvalues", "mean", "std", "cov", "count")
# The value of the one-hots of `pair_adjacency`: a power of two, so dividing it out again is exact,
# and small, so that a ReLU6 between two sites never clips.
_ONE_HOT = 2.0 ** -10

log = get_logger(__name__)


def record_sites(net) -> list:
    """The `layer_out` sites of every conv, depthwise conv and dense layer, in forward order; the
    last is the logits."""
    return [site.name for site in net.sites()
            if site.kind == "layer_out" and isinstance(site.layer, (Conv2d, DepthwiseConv2d, FC))]


def _zero_input(net, n: int):
    size = net.config.get("input_size", 28)
    channels = net.groups["input"].size if "input" in net.groups else 1
    return tf.zeros([n, size, size, channels])


def site_shapes(net, sites) -> dict:
    """`{site: per-example shape}` (one eager call on a zero input)."""
    record = Record(sites)
    net(_zero_input(net, 1), training=False, tap=record)
    missing = [name for name in sites if name not in record.values]
    if missing:
        raise ValueError(f"{net.arch} has no activation site {missing[0]!r}")
    return {name: tuple(int(d) for d in record.values[name].shape[1:]) for name in sites}


# === Streaming moments ===
class ClassMoments:
    """Per-class count, mean and population covariance of streamed rows, in float64.

    Rows wait per class until `chunk` of them have come, then merge into the class's running
    mean and centred sum of outer products M2 by Chan et al.'s parallel update: with the
    chunk's count n_b, mean m_b and centred M2_b, and delta = m_b - m_a,
    `m = m_a + delta n_b / n`, `M2 = M2_a + M2_b + delta delta^T n_a n_b / n` (n = n_a + n_b).
    Nothing is sensitive to the data's offset, and a D x D update is made once a chunk rather
    than once a batch. Reading a property merges what waits.

    Args:
        num_classes, dim: C classes of rows of D values.
        chunk: rows a class collects before they are merged.
        what: names these statistics in errors (a site).
    """

    def __init__(self, num_classes: int, dim: int, chunk: int = 256, what: str = "statistics"):
        self.num_classes, self.dim, self.chunk, self.what = int(num_classes), int(dim), int(chunk), what
        self._n = np.zeros(self.num_classes, np.int64)
        self._mean = np.zeros((self.num_classes, self.dim))
        self._m2 = np.zeros((self.num_classes, self.dim, self.dim))  # zero pages: an unseen class costs nothing
        self._waiting = [[] for _ in range(self.num_classes)]
        self._waiting_rows = np.zeros(self.num_classes, np.int64)

    def update(self, x, labels) -> None:
        """Add rows `x [b, dim]` of classes `labels [b]`."""
        x, labels = np.asarray(x), np.asarray(labels).reshape(-1)
        if x.shape != (len(labels), self.dim):
            raise ValueError(f"{self.what}: rows of shape {x.shape} with {len(labels)} labels; expected "
                             f"[{len(labels)}, {self.dim}]")
        if len(labels) and not (labels.min() >= 0 and labels.max() < self.num_classes):
            raise ValueError(f"{self.what}: a label outside 0..{self.num_classes - 1}")
        for c in np.unique(labels):
            self._waiting[c].append(x[labels == c])
            self._waiting_rows[c] += int(np.sum(labels == c))
            if self._waiting_rows[c] >= self.chunk:
                self._merge(c)

    def _merge(self, c: int) -> None:
        rows = np.concatenate(self._waiting[c]).astype(np.float64)
        self._waiting[c], self._waiting_rows[c] = [], 0
        n_a, n_b = int(self._n[c]), len(rows)
        n = n_a + n_b
        mean_b = rows.mean(axis=0)
        centred = rows - mean_b
        delta = mean_b - self._mean[c]
        self._mean[c] += delta * (n_b / n)
        self._m2[c] += centred.T @ centred
        self._m2[c] += np.outer(delta, delta) * (n_a * n_b / n)  # outer(d, d): exactly symmetric
        self._n[c] = n

    def _merged(self) -> None:
        for c in np.flatnonzero(self._waiting_rows):
            self._merge(c)

    def _check_seen(self) -> None:
        unseen = np.flatnonzero(self._n == 0)
        if len(unseen):
            raise ValueError(f"{self.what}: class{'es' if len(unseen) > 1 else ''} "
                             f"{', '.join(map(str, unseen))} never seen")

    @property
    def count(self) -> np.ndarray:
        """[C] examples per class."""
        self._merged()
        return self._n.copy()

    @property
    def mean(self) -> np.ndarray:
        """[C, dim]."""
        self._merged()
        self._check_seen()
        return self._mean.copy()

    def class_cov(self, c: int) -> np.ndarray:
        """[dim, dim]: the population covariance of class `c` alone (less memory than `cov`)."""
        self._merged()
        self._check_seen()
        return self._m2[c] / self._n[c]

    @property
    def cov(self) -> np.ndarray:
        """[C, dim, dim] population covariances (divided by n)."""
        return np.stack([self.class_cov(c) for c in range(self.num_classes)])

    @property
    def std(self) -> np.ndarray:
        """[C, dim]: the square roots of the covariances' diagonals."""
        self._merged()
        self._check_seen()
        return np.sqrt(np.einsum("cii->ci", self._m2) / self._n[:, None])


def _summary(moments: ClassMoments) -> dict:
    """A `ClassMoments` as float32 arrays (the covariance converted class by class) and int64 counts."""
    cov = np.empty((moments.num_classes, moments.dim, moments.dim), np.float32)
    for c in range(moments.num_classes):
        cov[c] = moments.class_cov(c)
    return {"mean": moments.mean.astype(np.float32), "std": moments.std.astype(np.float32), "cov": cov,
            "count": moments.count}


# === Recording ===
def _site_batches(net, batches, sites, temperature: float):
    """Yields `(labels [b], {site: float32 [b, D]})` over `(images, labels, ...)` batches: one
    traced forward pass records every site, flattened channel-last, the logits divided by T."""
    names, logits = list(sites), record_sites(net)[-1]

    def step(images):
        record = Record(names)
        net.forward_until(images, lambda: len(record.values) == len(names), training=False, tap=record)
        flat = {}
        for name in names:
            value = record.values[name] / temperature if name == logits else record.values[name]
            flat[name] = tf.reshape(value, [tf.shape(value)[0], -1])
        return flat

    step = fresh_function(step, reduce_retracing=True)
    for batch in batches:
        flat = step(tf.cast(batch[0], tf.float32))
        yield np.asarray(batch[1]).reshape(-1).astype(np.int64), {k: v.numpy() for k, v in flat.items()}


def collect_statistics(net, batches, sites, temperature: float, num_classes: int, fraction: float | None = None,
                       mode: str | None = None, layers: bool = True) -> tuple:
    """Layer statistics (unless `layers` is False) and, with a spectral `mode`, spectral
    statistics, in one pass over `batches`: `(layers dict or None, spectral dict or None)` as
    `layer_statistics` and `spectral_statistics` return them."""
    sites = list(sites)
    if mode is not None and mode not in MODES:
        raise ValueError(f"spectral mode {mode!r} is not one of {', '.join(MODES)}")
    graphs = _graphs(net, sites, fraction, mode) if mode is not None else {}
    shapes = site_shapes(net, sites)
    site_moments = {s: ClassMoments(num_classes, math.prod(shapes[s]), what=s) for s in sites} if layers else {}
    graph_moments = {name: ClassMoments(num_classes, g["basis"].shape[1], what=f"spectral {name}")
                     for name, g in graphs.items()}
    seen = 0
    for labels, flat in _site_batches(net, batches, sites, temperature):
        seen += len(labels)
        for site, moments in site_moments.items():
            moments.update(flat[site], labels)
        for name, graph in graphs.items():
            values = np.concatenate([flat[s] for s in graph["sites"]], axis=1).astype(np.float64)
            graph_moments[name].update(values @ graph["basis"].astype(np.float64), labels)
    if not seen:
        raise ConfigError("the DFKD statistics got no images")
    layer_stats = {s: {**_summary(m), "shape": shapes[s]} for s, m in site_moments.items()} if layers else None
    spectral = {name: {**graph, **_summary(graph_moments[name])} for name, graph in graphs.items()} or None
    return layer_stats, spectral


def layer_statistics(net, batches, sites, temperature: float, num_classes: int) -> dict:
    """`{site: {"mean" [C, D], "std" [C, D], "cov" [C, D, D] (float32), "count" [C] (int64),
    "shape" (tuple)}}` of `net(images, training=False)` over `(images, labels, ...)` batches;
    the logits divided by `temperature` (module docstring)."""
    return collect_statistics(net, batches, sites, temperature, num_classes)[0]


# === Spectral statistics ===
def _absolute_copy(net):
    """An unmasked copy of `net` with |kernels|, |BN gammas|, zero biases, BN shifts and means."""
    if net.attachments():
        raise ValueError(f"{net.arch}: pair_adjacency needs a net without transforms (fold or slim them first)")
    if any(group.active() < group.size for group in net.prunable_groups().values()):
        raise ValueError(f"{net.arch}: pair_adjacency needs open masks (slim the net first)")
    copy = type(net)(arch=net.arch, widths=net.widths(), masked=False, **net.config)  # as nets.base constructs nets
    params = {}
    for key, value in net.get_params().items():
        name = key.rpartition("/")[2]
        if name in ("kernel:0", "gamma:0"):
            params[key] = np.abs(value)
        elif name in ("biases:0", "beta:0", "moving_mean:0"):
            params[key] = np.zeros_like(value)
        elif name == "moving_variance:0":
            params[key] = value
        else:
            raise ValueError(f"{net.arch}: pair_adjacency does not know parameter {key}")
    copy.set_params(params)
    return copy


def pair_adjacency(net, site_a: str, site_b: str, chunk: int = 512) -> np.ndarray:
    """[D_a, D_b] float32: the absolute linear connection strengths from the units of `site_a` to
    those of the later `site_b` (module docstring), from the forward pass of the net's absolute
    copy: a tap zeroes every site before `site_a` (a residual shortcut then carries zeros),
    replaces `site_a` by `chunk` one-hots at a time and records `site_b`."""
    copy = _absolute_copy(net)
    shapes = site_shapes(copy, [site_a, site_b])
    order = [site.name for site in copy.sites()]
    if order.index(site_a) >= order.index(site_b):
        raise ValueError(f"{net.arch}: site {site_b} does not come after {site_a}")
    dim_a = math.prod(shapes[site_a])

    def responses(units):
        reached, record = [False], Record([site_b])

        def tap(site, x):
            if site.name == site_a:  # trace time: the Python flag follows the forward order
                reached[0] = True
                return tf.reshape(tf.one_hot(units, dim_a) * _ONE_HOT, [-1, *shapes[site_a]])
            return record(site, x) if reached[0] else tf.zeros_like(x)

        copy.forward_until(_zero_input(copy, tf.shape(units)[0]), lambda: bool(record.values), tap=tap)
        return tf.reshape(record.values[site_b], [tf.shape(units)[0], -1])

    responses = fresh_function(responses, input_signature=[tf.TensorSpec([None], tf.int32)])
    rows = [responses(tf.range(start, min(start + chunk, dim_a))).numpy() for start in range(0, dim_a, chunk)]
    return np.concatenate(rows) / np.float32(_ONE_HOT)


def graph_basis(blocks, fraction: float) -> tuple:
    """`(U [D_total, k], eigenvalues [k])`, float64: the Laplacian eigenvectors of the smallest
    eigenvalues of the chain whose consecutive pair adjacencies are `blocks` (module docstring)."""
    sizes = [blocks[0].shape[0]] + [block.shape[1] for block in blocks]
    for t, (before, after) in enumerate(zip(blocks, blocks[1:])):
        if before.shape[1] != after.shape[0]:
            raise ValueError(f"graph_basis: block {t} has {before.shape[1]} columns, block {t + 1} "
                             f"{after.shape[0]} rows")
    if not 0 < fraction <= 1:
        raise ValueError(f"graph_basis: fraction {fraction} is outside (0, 1]")
    starts = np.cumsum([0] + sizes)
    total = int(starts[-1])
    k = max(1, round(fraction * total))
    laplacian = np.zeros((total, total))
    for t, block in enumerate(blocks):
        rows, cols = slice(starts[t], starts[t + 1]), slice(starts[t + 1], starts[t + 2])
        laplacian[rows, cols] = -np.asarray(block, np.float64)
        laplacian[cols, rows] = laplacian[rows, cols].T
    laplacian[np.diag_indices(total)] = -laplacian.sum(axis=1)
    import scipy.linalg  # here: requirements*.txt do not list scipy, and nothing else in this module needs it

    values, vectors = scipy.linalg.eigh(laplacian, subset_by_index=[0, k - 1], overwrite_a=True, check_finite=False)
    magnitudes = np.abs(vectors)
    # The first entry of the largest magnitude, ties within round-off included (a symmetric graph has many).
    largest = np.argmax(magnitudes >= magnitudes.max(axis=0) * (1 - 1e-6), axis=0)
    vectors *= np.sign(vectors[largest, np.arange(k)])
    return vectors, values


def _graphs(net, sites, fraction, mode) -> dict:
    """`{graph name: {"sites", "basis" (float32), "eigenvalues" (float32)}}` of spectral `mode`."""
    if len(sites) < 2:
        raise ValueError("spectral statistics need at least two sites")
    pairs = list(zip(sites, sites[1:]))
    blocks = [pair_adjacency(net, a, b) for a, b in pairs]
    chains = {"all": (sites, blocks)} if mode == "all_layers" else \
        {f"{a}|{b}": ([a, b], [block]) for (a, b), block in zip(pairs, blocks)}
    graphs = {}
    for name, (graph_sites, graph_blocks) in chains.items():
        basis, eigenvalues = graph_basis(graph_blocks, fraction)
        graphs[name] = {"sites": list(graph_sites), "basis": basis.astype(np.float32),
                        "eigenvalues": eigenvalues.astype(np.float32)}
    return graphs


def spectral_statistics(net, batches, sites, temperature: float, num_classes: int, fraction: float,
                        mode: str) -> dict:
    """`{graph name: {"sites", "basis" [D_total, k], "eigenvalues" [k], "mean" [C, k], "cov" [C, k, k],
    "std" [C, k] (float32), "count" [C] (int64)}}`: per class, the moments of the coefficients
    `U^T s` on the graph basis as saved (float32), for mode `all_layers` or `layer_pairs`
    (module docstring)."""
    return collect_statistics(net, batches, sites, temperature, num_classes, fraction, mode, layers=False)[1]


# === The metadata file ===
def save_stats(path: str, net, temperature: float, layers: dict, spectral: dict | None) -> None:
    """Write the statistics of teacher `net` to one `.npz` at `path`, atomically (module docstring)."""
    if list(layers) != record_sites(net):
        raise ValueError(f"save_stats: layer statistics of sites {list(layers)}, not the net's {record_sites(net)}")
    meta = {"format": FORMAT, "spec": net.spec(), "sites": list(layers), "temperature": float(temperature),
            "spectral": None if spectral is None else {name: list(g["sites"]) for name, g in spectral.items()}}
    arrays = {"meta": np.array(json.dumps(meta))}
    for site, stats in layers.items():
        arrays.update({f"layer/{site}/{field}": np.asarray(stats[field]) for field in LAYER_FIELDS})
    for name, stats in (spectral or {}).items():
        arrays.update({f"spectral/{name}/{field}": np.asarray(stats[field]) for field in SPECTRAL_FIELDS})
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _read_arrays(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"DFKD statistics file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with data:
                return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable DFKD statistics file ({reason})") from None


def _spec_difference(saved: dict, current: dict) -> str | None:
    """What differs between two specs' arch, config and widths (JSON-normalised), or None."""
    current = json.loads(json.dumps(current))
    for part in ("arch", "config", "widths"):
        a, b = saved.get(part), current.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{part} {key} {a.get(key)}, not {b.get(key)}"
        elif a != b:
            return f"{part} {a}, not {b}"
    return None


def load_stats(path: str, net, need_spectral: bool = False) -> tuple:
    """`(temperature, layers, spectral or None)` from a file `save_stats` wrote for `net`'s
    architecture and widths.

    Raises:
        ConfigError: one line naming `path`: a missing or unreadable file, one of another
            format, architecture, config or widths or site list, or one without spectral
            statistics when `need_spectral`.
    """
    path = os.fspath(path)
    arrays = _read_arrays(path)
    try:
        meta = json.loads(str(arrays["meta"]))
        version = meta["format"]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: not a DFKD statistics file (no readable 'meta')") from None
    if version != FORMAT:
        raise ConfigError(f"{path}: DFKD statistics format {version}; this version reads format {FORMAT}")
    difference = _spec_difference(meta["spec"], net.spec())
    if difference:
        raise ConfigError(f"{path}: statistics of another net than this {net.arch} ({difference})")
    if meta["sites"] != record_sites(net):
        raise ConfigError(f"{path}: statistics of sites {meta['sites']}, not this net's {record_sites(net)}")
    if need_spectral and not meta["spectral"]:
        raise ConfigError(f"{path} holds no spectral statistics; record them with a spectral mode")

    def fields(prefix: str, names) -> dict:
        try:
            return {field: arrays[f"{prefix}/{field}"] for field in names}
        except KeyError as err:
            raise ConfigError(f"{path}: array {err.args[0]} is missing") from None

    layers = {}
    for site in meta["sites"]:
        layers[site] = fields(f"layer/{site}", LAYER_FIELDS)
        layers[site]["shape"] = tuple(int(d) for d in layers[site]["shape"])
    spectral = None
    if meta["spectral"]:
        spectral = {name: {"sites": list(graph_sites), **fields(f"spectral/{name}", SPECTRAL_FIELDS)}
                    for name, graph_sites in meta["spectral"].items()}
    return float(meta["temperature"]), layers, spectral


# === Sampling ===
def cholesky_factor(cov, what: str) -> np.ndarray:
    """The lower Cholesky factor (float64) of `cov`; a singular one (MNIST's constant border
    pixels make whole conv maps constant) gets `eps * mean(diag)` on its diagonal, eps = 1e-6,
    1e-5, ... 1e-1 until the factor exists, logged in one line naming `what`."""
    cov = np.asarray(cov, np.float64)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        pass
    scale = float(np.mean(np.diag(cov)))
    scale = scale if scale > 0 else 1.0  # an all-zero covariance (a constant site): jitter of 1 x eps
    for exponent in range(-6, 0):
        jitter = 10.0 ** exponent * scale
        try:
            factor = np.linalg.cholesky(cov + jitter * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            continue
        log.warning(f"{what}: covariance not positive definite; added 1e{exponent} x its mean variance "
                    f"({jitter:.3g}) to the diagonal")
        return factor
    raise ValueError(f"{what}: covariance not positive definite even with 0.1 x its mean variance on the diagonal")


def sample_targets(mean, chol, n: int, seed: int) -> np.ndarray:
    """[n, D] float32 targets `mean + eps @ chol^T`, eps ~ N(0, I) from `np.random.default_rng(seed)`:
    covariance `chol chol^T` (the original multiplied eps by the covariance itself, a bug)."""
    mean, chol = np.asarray(mean, np.float64), np.asarray(chol, np.float64)
    eps = np.random.default_rng(seed).standard_normal((int(n), len(mean)))
    return (mean + eps @ chol.T).astype(np.float32)
