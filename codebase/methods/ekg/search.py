"""EKG's greedy sub-network search (Lee & Song, ECCV 2022), on the masked net.

Every prunable channel group is a gate with a keep `rate` (1 = all channels) and an `order`
(rank of each channel by importance). One search step:

1. score: accumulate `|sum(dy * y)|` per channel over the search-validation set through score
   taps, for `J = CE(y, z) + CE(softmax(K), z)` where `K` is the ensemble knowledge (the
   running mean of the logits of all accepted sub-networks), and re-rank every gate;
2. candidates: the gates whose next slice of lowest-scored live channels costs at most the
   trimmed-Otsu threshold of all gates' costs;
3. try each candidate: lower its rate by `max(1/C, search_step / num_call)` (a fine search in
   1/C steps keeps the largest width at or under the FLOPs target), evaluate `J` on the
   search-validation set with batch statistics (no moving-statistics updates), restore;
4. accept the candidate with the lowest `J`; fold its logits into the ensemble.

The search stops when the FLOPs (EKG convention) reach `target_rate` of the original. Masks are
variables, so the score and evaluation functions are traced once for the whole search.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import tensorflow as tf

from codebase.budget import FlopsBudget
from nets.layers import BatchNorm
from op_utils.taps import score_tap
from utils.errors import ConfigError


def trimmed_otsu(costs, cut: float = 0.2) -> float:
    """Otsu threshold of `costs` after trimming `ceil(cut * n)` values from each end.

    Returns the midpoint of the two values around the split that maximises the between-class
    score `t (n - t) (mean_left - mean_right)^2`. With too few values to split, returns the
    largest cost (every gate is a candidate).
    """
    values = np.sort(np.asarray(costs, np.float64))
    trim = int(math.ceil(len(values) * cut))
    trimmed = values[trim:len(values) - trim]
    n = len(trimmed)
    if n < 3:
        return float(values[-1])
    splits = range(1, n - 1)  # the reference's range, so its thresholds are reproduced
    between = [t * (n - t) * (trimmed[:t].mean() - trimmed[t:].mean()) ** 2 for t in splits]
    best = int(np.argmax(between)) + 1
    return float((trimmed[best - 1] + trimmed[best]) / 2)


def keep_count(rate: float, size: int) -> int:
    """Channels kept at `rate`: the ranks k < max(rate * size, 1)."""
    return int(math.ceil(max(rate * size, 1.0) - 1e-9))


def uses_renorm(net) -> bool:
    """Whether EKG renormalises `net`'s masked kernels: only in a net with BatchNorm.

    Renormalisation (`W' = (W*M)|W|/|W*M|`) keeps the scale a BatchNorm's batch statistics would
    normalise away anyway; in a net without BatchNorm (LeNet-5, the MLP) it scales every layer's
    output and so the logits (measured on LeNet-5 / MNIST at 44% of the FLOPs: interim logits up to
    218 against 25 unpruned, and the memory-bank fine-tuning diverged), so those nets are searched
    with plain masks.
    """
    return any(isinstance(layer, BatchNorm) for layer in net.layers.values())


def set_masks(groups: dict, rates: dict, orders: dict) -> None:
    """Mask every gate's group to its `keep_count` best-ranked channels (rank 0 = best)."""
    for key, group in groups.items():
        group.set_mask(np.asarray(orders[key]) < keep_count(rates[key], group.size))


class _TracedOnce:
    """A function traced on its first call for one (open-shape) signature, then called as that
    concrete function: it never traces again, and tf.function's retracing warning does not take
    the search's many distinct segment functions for one function traced many times."""

    def __init__(self, fn, *signature):
        self._fn, self._signature, self._concrete = tf.function(fn, autograph=False), signature, None

    def __call__(self, *args):
        if self._concrete is None:
            self._concrete = self._fn.get_concrete_function(*self._signature)
        return self._concrete(*args)


@dataclasses.dataclass
class SearchState:
    """Everything a search needs to continue: saved after every accepted step."""

    rates: dict
    orders: dict
    knowledge: np.ndarray
    members: int
    step: int
    history: list  # [(rates, orders, ce)] of accepted sub-networks, the unpruned one first
    curves: list  # [(step, acc, ce, flops_rate)]

    def to_json(self) -> dict:
        def gate(rates, orders):
            return {"rates": rates, "orders": {k: [int(i) for i in v] for k, v in orders.items()}}

        return {"gate": gate(self.rates, self.orders), "knowledge": self.knowledge.tolist(),
                "members": self.members, "step": self.step, "curves": self.curves,
                "history": [dict(gate(r, o), ce=ce) for r, o, ce in self.history]}

    @classmethod
    def from_json(cls, data: dict) -> "SearchState":
        def orders(d):
            return {k: np.asarray(v, np.int64) for k, v in d.items()}

        return cls(dict(data["gate"]["rates"]), orders(data["gate"]["orders"]),
                   np.asarray(data["knowledge"], np.float32), data["members"], data["step"],
                   [(dict(h["rates"]), orders(h["orders"]), h["ce"]) for h in data["history"]],
                   [tuple(c) for c in data["curves"]])


class GreedySearch:
    """The search on one masked net (see the module docstring).

    Args:
        net: a masked `Net` (built with `masked=True`); its masks are set by the search.
        images, labels: the search-validation set (inference preprocessing), numpy.
        target_rate: stop when FLOPs / original FLOPs <= target_rate.
        search_step: the width step of a gate used once per forward pass.
        batch_size: search batch size (BN statistics are per batch).
        on_step: optional callback `on_step(state, info)` after every accepted step.
        cache_mb: memory for cached segment inputs; fewer boundaries are cached if they do not fit.
        round_to: 1 for EKG's widths; N > 1 keeps every width a multiple of N (or the full width),
            so that CPU and GPU kernels, which work on blocks of 8 or 16 channels, run on full
            blocks and the FLOPs saved are time saved (Torch-Pruning's `round_to`).
    """

    def __init__(self, net, images, labels, target_rate=0.45, search_step=0.2, batch_size=256, on_step=None,
                 cache_mb=256, round_to=1):
        self.net, self.target_rate, self.search_step, self.on_step = net, target_rate, search_step, on_step
        if int(round_to) != round_to or round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        self.round_to = int(round_to)
        self.groups = net.prunable_groups()
        self.keys = list(self.groups)
        self.batches = [(tf.constant(images[i:i + batch_size], tf.float32), tf.constant(labels[i:i + batch_size], tf.int32))
                        for i in range(0, len(labels), batch_size)]
        self.count = len(labels)
        self.probes = {k: tf.Variable(tf.zeros([g.size]), trainable=False, name="probe") for k, g in self.groups.items()}
        self.num_call = self._count_taps(images[:1])
        self.coarse = {k: max(1.0 / g.size, search_step / self.num_call[k]) for k, g in self.groups.items()}
        self.budget = FlopsBudget(net)
        self.full_flops = self.budget.full_flops
        # EKG's search conventions: renormalised masked kernels (`uses_renorm`), batch statistics, no updates. In
        # compact mode the net computes on kept channels only, so a step costs what the current
        # sub-network costs (the outputs are the masked net's); set before anything is traced.
        net.options.set(renorm=uses_renorm(net), freeze_bn=True, compact=True)
        self.trace_count = 0
        matrix, vector = tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)
        self._metrics_fn = _TracedOnce(self._metrics, matrix, vector, matrix)
        # Candidates are evaluated from cached segment inputs: lowering one group's width cannot
        # change what the segments before its first use compute.
        self.segments = net.segments()
        self.first_use = {k: min(i for i, seg in enumerate(self.segments) if k in seg.groups) for k in self.keys}
        ranks, self.cached = self._choose_boundaries(images[:1], cache_mb)
        # Channel counts change with the widths: every dimension is left open so that nothing is
        # traced again when they do.
        specs = [tf.TensorSpec([None] * r, tf.float32) for r in ranks]
        self._segment_fns = [_TracedOnce(self._segment_runner(seg.fn), spec) for seg, spec in zip(self.segments, specs)]
        # The score pass is checkpointed at the same boundaries: each chunk of segments between two
        # cached inputs is run again, taps on, and back-propagated on its own, so only one chunk's
        # activations are alive at a time instead of the whole net's.
        bounds = self.cached + [len(self.segments)]
        self._chunk_fns = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            upstream = specs[b] if b < len(self.segments) else tf.TensorSpec([None], tf.float32)
            self._chunk_fns.append(_TracedOnce(self._chunk_backward(a, b), specs[a], upstream, vector, matrix))
        self._cache = None

    # === Compiled pieces ===
    def _tap(self, site, x):
        if not site.final or site.group.key not in self.probes:  # a fixed stream (option-A ResNets) has no gate
            return x
        group = site.group
        probe = self.probes[group.key]
        # Compact activations carry the kept channels only: score those entries of the probe.
        return score_tap(x, tf.gather(probe, group.kept_index()) if group.masked else probe)

    def _count_taps(self, image) -> dict:
        counts = dict.fromkeys(self.keys, 0)

        def counting(site, x):
            if site.final and site.group.key in counts:
                counts[site.group.key] += 1
            return x

        self.net(tf.constant(image, tf.float32), training=False, tap=counting)
        missing = [k for k, c in counts.items() if c == 0]
        if missing:
            raise ValueError(f"{self.net.arch}: group {missing[0]} is never tapped; its forward must tap every group")
        return counts

    def _objective(self, logits, labels, knowledge):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        soft = -tf.reduce_sum(tf.nn.softmax(knowledge) * tf.nn.log_softmax(logits), -1)
        return ce, ce + soft

    def _chunk_backward(self, start: int, end: int):
        """`fn(x, upstream, labels, knowledge) -> (dJ/dx, per-probe scores)` for segments[start:end].

        The last chunk ends in the logits and starts from `J` (summed over the batch and divided
        by the first batch's size, as the reference divides by its search batch size); the others
        start from `upstream`, the gradient of `J` with respect to their output.
        """
        last = end == len(self.segments)
        probes = list(self.probes.values())
        size = float(self.batches[0][0].shape[0])

        def fn(x, upstream, labels, knowledge):
            self.trace_count += 1
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([x] + probes)
                y = x
                for segment in self.segments[start:end]:
                    y = segment.fn(y, True, self._tap)
                if last:
                    y = tf.reduce_sum(self._objective(y, labels, knowledge)[1]) / size
            grads = tape.gradient(y, [x] + probes, output_gradients=None if last else upstream,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads[0], [tf.convert_to_tensor(g) for g in grads[1:]]  # gathered probes: dense

        return fn

    def _segment_runner(self, fn):
        def run(x):
            self.trace_count += 1
            return fn(x, True)

        return run

    def _metrics(self, logits, labels, knowledge):
        self.trace_count += 1
        ce, j = self._objective(logits, labels, knowledge)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(ce), tf.reduce_sum(j), correct

    def _choose_boundaries(self, image, cache_mb):
        """(rank of every segment's input, segment indices whose inputs are cached: all of them if
        they fit in `cache_mb` at full width)."""
        sizes, x = [], tf.constant(image, tf.float32)
        ranks = [len(x.shape)]
        for seg in self.segments[:-1]:
            x = seg.fn(x, False)
            ranks.append(len(x.shape))
            sizes.append(int(np.prod(x.shape)) * 4 * self.count)
        stride = max(1, math.ceil(sum(sizes) / (cache_mb * 2 ** 20)))
        return ranks, [0] + [i + 1 for i in range(len(sizes)) if (i + 1) % stride == 0]

    def _run_segments(self, start: int, keep_cache: bool):
        """Logits of every validation batch, running segments from `start` on cached inputs."""
        outputs, cache = [], []
        for b, (images, _) in enumerate(self.batches):
            x = images if start == 0 else self._cache[b][start]
            inputs = {0: images}
            for i in range(start, len(self.segments)):
                if keep_cache and i in self.cached:
                    inputs[i] = x
                x = self._segment_fns[i](x)
            outputs.append(x)
            cache.append(inputs)
        if keep_cache:
            self._cache = cache
        return outputs

    # === Host-side pieces ===
    def widths(self, rates) -> dict:
        return {k: keep_count(rates[k], self.groups[k].size) for k in self.keys}

    def flops_rate(self, rates) -> float:
        return self.budget.rate(self.widths(rates))

    def apply(self, rates, orders) -> None:
        set_masks(self.groups, rates, orders)

    def evaluate(self, knowledge, key=None):
        """(logits, accuracy, mean CE, mean J) of the current masks on the validation set.

        With `key`, only the masks of that group differ from those the cache was built with,
        so the segments before its first use are skipped.
        """
        if key is None:
            outputs = self._run_segments(0, keep_cache=False)
        else:
            start = max(b for b in self.cached if b <= self.first_use[key])
            outputs = self._run_segments(start, keep_cache=False)
        ce = j = correct = 0.0
        begin = 0
        for (_, labels), logits in zip(self.batches, outputs):
            end = begin + int(labels.shape[0])
            out = self._metrics_fn(logits, labels, tf.constant(knowledge[begin:end]))
            ce, j, correct, begin = ce + float(out[0]), j + float(out[1]), correct + float(out[2]), end
        return np.concatenate([o.numpy() for o in outputs]), correct / self.count, ce / self.count, j / self.count

    def score(self, knowledge) -> dict:
        """Per-channel scores of every group, summed over the validation set.

        Runs the current net once, caching segment inputs (the candidates start from them), then
        back-propagates chunk by chunk from the cached inputs (see `__init__`): the same scores
        as one tape over the whole net, with the memory of one chunk.
        """
        # Drop the previous net's cache first: rebuilt beside it, both would be alive at once.
        self._cache = None
        self._run_segments(0, keep_cache=True)
        totals = {k: np.zeros(self.groups[k].size) for k in self.keys}
        begin = 0
        for b, (images, labels) in enumerate(self.batches):
            end = begin + int(labels.shape[0])
            target = tf.constant(knowledge[begin:end])
            upstream = tf.zeros([0])
            for c in reversed(range(len(self._chunk_fns))):
                upstream, grads = self._chunk_fns[c](self._cache[b][self.cached[c]], upstream, labels, target)
                for k, g in zip(self.keys, grads):
                    totals[k] += g.numpy()
            begin = end
        return totals

    @staticmethod
    def rank(scores, mask) -> np.ndarray:
        """Rank 0 = most important; masked channels (score 0) rank after every live one."""
        order = np.lexsort((np.arange(len(scores)), -scores, mask < 0.5))
        ranks = np.empty(len(scores), np.int64)
        ranks[order] = np.arange(len(scores))
        return ranks

    def candidates(self, scores, rates) -> list:
        """Gates whose next slice of live channels is cheap enough (trimmed Otsu)."""
        costs = {}
        for k in self.keys:
            if rates[k] <= 0:
                continue
            size = self.groups[k].size
            ranked = np.sort(scores[k])
            if self.round_to == 1:
                start = round((1.0 - rates[k]) * size)
                end = round((1.0 - rates[k] + self.coarse[k]) * size)
            else:
                width = self._lattice_step(k, rates[k])
                if width is None:
                    continue
                start, end = size - keep_count(rates[k], size), size - width
            costs[k] = float(ranked[start:end].sum())
        if not costs:
            return []
        threshold = trimmed_otsu(list(costs.values()))
        return [k for k, c in costs.items() if c <= threshold]

    def _lattice_step(self, key, rate) -> int | None:
        """With `round_to` > 1: the width after the coarse step down, rounded down to a multiple of
        `round_to` and at least one multiple below the current width; None if that is below
        `round_to` (the group stays as it is)."""
        size, step = self.groups[key].size, self.round_to
        current = keep_count(rate, size)
        width = min(keep_count(round(rate - self.coarse[key], 5), size) // step, (current - 1) // step) * step
        return width if width >= step else None

    def next_rate(self, rates, key) -> float:
        """The coarse step down for `key`, refined in 1/C steps (`round_to`/C steps with
        `round_to`) when it overshoots the target."""
        trial = dict(rates)
        size = self.groups[key].size
        if self.round_to > 1:
            width = self._lattice_step(key, rates[key])
            trial[key] = width / size
            if self.flops_rate(trial) >= self.target_rate:
                return trial[key]
            best = width
            for wider in range(width + self.round_to, keep_count(rates[key], size), self.round_to):
                trial[key] = wider / size
                if self.flops_rate(trial) > self.target_rate:
                    break
                best = wider
            return best / size
        trial[key] = round(rates[key] - self.coarse[key], 5)
        if self.flops_rate(trial) >= self.target_rate:
            return trial[key]
        fine = 1.0 / size
        best = trial[key]
        for w in np.arange(trial[key], trial[key] + self.search_step, fine):
            trial[key] = round(float(w), 2)
            if self.flops_rate(trial) > self.target_rate:
                return round(float(w) - fine, 5)
            best = trial[key]
        return best

    # === The search ===
    def initial_state(self) -> SearchState:
        self.net.reset_masks()
        rates = dict.fromkeys(self.keys, 1.0)
        orders = {k: np.arange(g.size) for k, g in self.groups.items()}
        knowledge0 = np.zeros([self.count, self.net.groups["logits"].size], np.float32)
        logits, acc, ce, _ = self.evaluate(knowledge0)
        return SearchState(rates, orders, logits, 1, 0, [(dict(rates), dict(orders), ce)], [(0, acc, ce, 1.0)])

    def run(self, state: SearchState | None = None) -> SearchState:
        """Search until the FLOPs target; `state` continues an interrupted search."""
        state = state or self.initial_state()
        while self.flops_rate(state.rates) > self.target_rate:
            tic = time.perf_counter()
            self.apply(state.rates, state.orders)
            scores = self.score(state.knowledge)  # also caches the accepted net's segment inputs
            state.orders = {k: self.rank(scores[k], self.groups[k].mask_numpy()) for k in self.keys}
            best = None
            # Re-ranking keeps the live channels live (they rank first), so the masks and the
            # cache built by score() stay valid; each candidate sets its own masks below.
            candidates = self.candidates(scores, state.rates)
            if not candidates:
                granularity = f" with --search_round_to {self.round_to}" if self.round_to > 1 else ""
                raise ConfigError(f"the search cannot go below {self.flops_rate(state.rates):.4f} of the FLOPs "
                                  f"(target {self.target_rate}): every group is at its smallest width{granularity}")
            for key in candidates:
                rates = dict(state.rates)
                rates[key] = self.next_rate(state.rates, key)
                self.apply(rates, state.orders)
                logits, acc, ce, j = self.evaluate(state.knowledge, key)
                if best is None or j < best[0]:
                    best = (j, key, rates, logits, acc, ce)
            j, key, rates, logits, acc, ce = best
            state.rates = rates
            state.knowledge = (state.knowledge * state.members + logits) / (state.members + 1)
            state.members += 1
            state.step += 1
            state.history.append((dict(rates), dict(state.orders), ce))
            flops = self.flops_rate(rates)
            state.curves.append((state.step, acc, ce, flops))
            self.apply(state.rates, state.orders)
            if self.on_step is not None:
                self.on_step(state, dict(key=key, acc=acc, ce=ce, j=j, flops_rate=flops,
                                         candidates=len(candidates), seconds=time.perf_counter() - tic))
        self.apply(state.rates, state.orders)
        return state
