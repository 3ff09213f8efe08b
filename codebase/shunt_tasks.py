"""The pieces of the shunt procedure (`codebase.methods.shunt`): splits, knowledge quotients, placement,
the shunt's regression task.

* `stratified_split(labels, fraction, seed)`: a validation split of the *training* set, the
  same fraction of every class (the original measured its quotients on the test set).
* `SkipBlocks` / `knowledge_quotients`: each residual block removed in turn (its output replaced
  by its input, through a tap: no weight of any block is touched) and the accuracy measured;
  `KQ = 1 - acc_without / acc_original`. The removal is a variable, so one traced evaluation
  serves every block.
* `choose_run`: the contiguous run of blocks with the lowest knowledge quotients whose shunt cuts
  at least a given fraction of the FLOPs.
* `ShuntRegress`: the shunt trained alone to regress the replaced run's output feature map (MSE),
  the original frozen and run in inference mode inside the same compiled step.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets import complexity, shunt
from nets.base import Net
from op_utils.evaluate import Evaluator
from op_utils.task import LossOut, Task, inputs_labels
from utils.errors import ConfigError


def stratified_split(labels, fraction: float, seed: int) -> tuple:
    """`(train, val)` index arrays (sorted): `round(fraction * n_c)` examples of each class `c` go to
    validation (at least one of every class that has two), drawn with `seed`."""
    labels = np.asarray(labels).reshape([-1])
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(len(members) - 1, max(1, int(round(fraction * len(members))))) if len(members) > 1 else 0
        val.extend(rng.choice(members, take, replace=False).tolist())
    val = np.sort(np.asarray(val, np.int64))
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val)
    return train, val


def input_site(net, first: str) -> str:
    """The block site whose output enters block `first` (`stem` for the first block)."""
    names = [name for name, site in net.final_sites().items() if site.kind == "block"]
    if first not in names or names.index(first) == 0:
        raise ConfigError(f"{net.arch}: no block site before {first!r}")
    return names[names.index(first) - 1]


class SkipBlocks(tf.Module):
    """A classifier `net(x, training)` in which residual block `i` is removed when `skip[i]` is 1.

    A removed block's output is replaced by its input (the previous block site's output), so the
    block adds nothing; every other layer computes as before. `skip` is a variable: one trace
    evaluates every removal.
    """

    def __init__(self, net, names):
        super().__init__(name="skip_blocks")
        self.net, self.names = net, list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.skip = tf.Variable(tf.zeros([len(self.names)]), trainable=False, name="skip")

    def __call__(self, x, training=False):
        previous = []

        def tap(site, y):
            if site.kind != "block":
                return y
            i = self.index.get(site.name)
            if i is not None and previous:
                y = tf.where(self.skip[i] > 0.5, previous[-1], y)
            previous.append(y)
            return y

        return self.net(x, training=training, tap=tap)


def knowledge_quotients(strategy, net, dataset, xla: bool = False) -> dict:
    """`{"original": top1, "blocks": {name: {"top1", "kq"}}}` for every residual block of `net`
    (`net.block_table`), measured on `dataset` (`(images, labels)` batches)."""
    names = [b.name for b in net.block_table if b.residual]
    with strategy.scope():
        model = SkipBlocks(net, names)
    evaluator = Evaluator(strategy, model, xla)
    original = evaluator.evaluate(dataset)["top1"]
    blocks = {}
    for i, name in enumerate(names):
        model.skip.assign(tf.one_hot(i, len(names)))
        top1 = evaluator.evaluate(dataset)["top1"]
        blocks[name] = {"top1": float(top1), "kq": float(1.0 - top1 / original) if original > 0 else 0.0}
    model.skip.assign(tf.zeros([len(names)]))
    return {"original": float(original), "blocks": blocks}


def run_cost(net, first: str, last: str, arch: int, expand: int | None, bottleneck: int | None,
             cache: dict | None = None) -> float:
    """EKG-convention FLOPs of `net` with blocks `first..last` shunted, counted without building the
    shunted net: the net's cost less its replaced blocks' layers plus the shunt's layers (built on
    a scratch net of two groups). A shape the architecture cannot make raises ConfigError."""
    table = [b.name for b in net.block_table]
    run = shunt.plan(net.arch, table, [shunt.entry(first, last, arch, expand, bottleneck)])[0]
    blocks = {name: site for name, site in net.final_sites().items() if site.kind == "block"}
    source = blocks[input_site(net, first)]
    info = {b.name: b for b in net.block_table}
    width = complexity.width_fn_from(None)
    key = (source.group.size, blocks[last].group.size, info[first].in_hw, info[last].out_hw, run.arch, run.expand,
           run.bottleneck)
    cache = {} if cache is None else cache  # shunts of the same shapes cost the same
    if key not in cache:
        scratch = Net("shunt_cost", {})
        replaced = shunt.Shunt(scratch, run, scratch.group("in", key[0]), scratch.group("out", key[1]), key[2], key[3])
        cache[key] = complexity.net_cost(replaced.layers.values(), width).ekg_flops
    prefixes = tuple(name + "/" for name in table[run.first_index:run.last_index + 1])
    kept = [layer for key, layer in net.layers.items() if not key.startswith(prefixes)]
    return complexity.net_cost(kept, width).ekg_flops + cache[key]


def choose_run(net, quotients: dict, flops_cut: float, arch: int, expand: int | None = None,
               bottleneck: int | None = None) -> dict:
    """The run to shunt: among the contiguous runs of `net`'s blocks whose shunt removes at least
    `flops_cut` of the net's FLOPs, the one with the lowest summed knowledge quotient. A block
    without a quotient (it changes the shape, so it cannot be removed alone) counts as the
    largest quotient measured: a run crosses it only when that pays. Ties go to the shorter,
    then the earlier run. Runs the architecture cannot shape (too many halvings) are skipped.

    Returns `{"first", "last", "score", "flops_cut"}`; ConfigError if no run reaches the cut.
    """
    table = net.block_table
    kq = {name: entry["kq"] for name, entry in quotients["blocks"].items()}
    worst = max(kq.values(), default=1.0)
    full = net.cost().ekg_flops
    best, cache = None, {}
    for a in range(len(table)):
        score = 0.0
        for b in range(a, len(table)):
            score += max(kq.get(table[b].name, worst), 0.0)
            if best is not None and (score, b - a) >= (best["score"], best["length"]):
                continue  # cannot win, and longer runs from `a` only add
            try:
                cut = 1.0 - run_cost(net, table[a].name, table[b].name, arch, expand, bottleneck, cache) / full
            except ConfigError:
                continue
            if cut >= flops_cut:
                best = {"first": table[a].name, "last": table[b].name, "score": score, "flops_cut": cut,
                        "length": b - a}
                break  # longer runs from `a` score no lower
    if best is None:
        raise ConfigError(f"{net.arch}: no contiguous run of blocks whose shunt (arch {arch}) removes "
                          f"{flops_cut:.1%} of the FLOPs; lower --shunt_flops_target or name --shunt_blocks")
    return {k: v for k, v in best.items() if k != "length"}


class ShuntRegress(Task):
    """Train one shunt of `shunted` to regress `original`'s output at the end of the run it replaces.

    Per example, the loss is the mean squared difference over the feature map (the original's
    "full attention transfer", which is this MSE). The original runs in inference mode behind
    `stop_gradient`; only the shunt's layers are trained (its BNs in training mode).

    Args:
        original: the unshunted net (frozen).
        shunted: the net holding the shunt.
        replaced: the `nets.shunt.Shunt` to train.
        source, target: the original's block sites entering and leaving the replaced run.
    """

    def __init__(self, original, shunted, replaced, source: str, target: str):
        super().__init__(name="shunt_regress")
        self.original, self.shunted, self.replaced = original, shunted, replaced
        self.source, self.target = source, target
        self._variables = [v for layer in replaced.layers.values() for v in layer.trainable_variables]

    def variables_to_train(self):
        return list(self._variables)

    def features(self, images):
        """The original's `(source, target)` feature maps of `images` (inference mode)."""
        record = {}

        def tap(site, y):
            if site.kind == "block" and site.name in (self.source, self.target):
                record[site.name] = y
            return y

        self.original.forward_until(images, lambda: self.target in record, training=False, tap=tap)
        return tf.stop_gradient(record[self.source]), tf.stop_gradient(record[self.target])

    def predict(self, x, training: bool):
        with self.shunted.state.mode(training):
            return self.replaced(self.shunted, x, training)

    def loss(self, batch, training):
        images, _ = inputs_labels(batch)
        x, target = self.features(images)
        y = self.predict(x, training)
        per_example = tf.reduce_mean(tf.square(tf.cast(y, tf.float32) - tf.cast(target, tf.float32)), axis=[1, 2, 3])
        return LossOut(per_example, {"mse": per_example})

    def checkpoint_items(self):
        return {"shunt": [layer for layer in self.replaced.layers.values()]}
