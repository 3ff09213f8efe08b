"""`--method shunt`: shunt connections (Singh et al.; Haas et al. 2021, the ShuntConnector's ten steps).

A run of contiguous blocks that carry little knowledge is replaced by one small block, the shunt
(`nets.shunt`), trained first to regress the replaced blocks' output, then fine-tuned inside the
net. The step's input net is the original (`--trained_param`, or the baseline the run trains:
the original's steps 2 and 3). Stages, each resumable, each saving its artefacts in the step's
folder:

1. `split`: a stratified validation split of the *training* set (`--shunt_val_fraction` of
   every class; `split.json`). The original measured its quotients on the test set.
2. `quotients`: for every residual block, the validation accuracy without it and its knowledge
   quotient `KQ = 1 - acc_without / acc_original` (`knowledge_quotients.json`, and the log).
3. `place`: the shunts, by block names (`--shunt_blocks block1:block6,block13:block14`), or
   the contiguous run with the lowest quotients whose shunt removes `--shunt_flops_target` of
   the FLOPs; strides from the shapes at both ends (`shunt.json`, `shunt_inserted.pkl`: the
   original's weights with fresh shunts).
4. `train_shunt`: each shunt alone, regressing the original's feature map at the end of its run
   (MSE), the original frozen; Adam at `--shunt_lr` (0.1), plateau decay on the training loss
   (x 0.1 after 4 epochs), `--shunt_epochs` (120) of batch `--shunt_batch_size` (24); the
   weights with the lowest validation loss are kept (`shunt_inserted.pkl` updated).
5. `train_final`: the shunt-inserted net, all layers trained on the training split with the
   step's optimisation (the original's: SGD 0.01, poly schedule power 0.9, 300 epochs, batch
   24), plus textbook Hinton KD from the original when `--shunt_kd_weight` > 0 (the original's
   intended T = 5, weight 4; its Keras code did not compute KD); the weights with the best
   validation accuracy are the step's output.
6. `latency`: median milliseconds per forward call of the original and the final net at batch
   1 and `--shunt_latency_batch` (`latency.json`).
7. `test`: `results.json` with the accuracy, params, FLOPs (both conventions, every layer) and
   latency of the original, shunt-inserted and final nets.

The final net is an ordinary net of the toolkit (its spec lists the shunts): `--method shunt,cp`
or `shunt,uq` prune or quantize it further.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tensorflow as tf

import nets
from codebase import shunt_tasks, stages
from codebase.artifacts import save_net
from codebase.evaluate import measure_latency
from codebase.methods.base import Method, Stage, register
from codebase.options import Options, fraction, option, positive
from codebase.tasks import Distill
from nets import shunt as shunts
from op_utils.evaluate import Evaluator
from op_utils.task import Classify
from op_utils.traced import fresh_function
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger
from utils.params_io import load_params, save_params
from utils.seed import fold_seed

log = get_logger(__name__)

SPLIT, QUOTIENTS, PLACED, LATENCY = "split.json", "knowledge_quotients.json", "shunt.json", "latency.json"
INSERTED = "shunt_inserted.pkl"
SHUNT_SEED = 19  # folded into the run's seed for the shunts' initialisation
WEIGHT_DECAY = 8e-5  # the original's L2 regulariser of 4e-5 on every kernel, as a gradient term


@dataclasses.dataclass(frozen=True)
class ShuntOptions(Options):
    """The shunt procedure's options (the ShuntConnector's defaults)."""

    shunt_blocks: Optional[str] = option(None, "shunt: the runs to replace, as first:last block names, comma-"
                                               "separated (default: one run chosen by knowledge quotient)")
    shunt_flops_target: float = option(0.335, "shunt: fraction of the FLOPs the automatically placed shunt must "
                                              "remove (Singh et al.: 0.335 with one shunt)")
    shunt_arch: int = option(1, "shunt: architecture (1: two stages, 4: one, 5: three)", choices=(1, 4, 5))
    shunt_expand: Optional[int] = option(None, "shunt: expanded width (default: 192, arch 4: 128)")
    shunt_bottleneck: Optional[int] = option(None, "shunt: width between its stages (default 64)")
    shunt_val_fraction: float = option(0.2, "shunt: fraction of every class of the training set held out for "
                                            "validation (quotients, best weights)")
    shunt_epochs: int = option(120, "shunt: epochs of the shunt's regression training")
    shunt_lr: float = option(0.1, "shunt: Adam learning rate of the shunt's training (plateau decay)")
    shunt_batch_size: int = option(24, "shunt: batch size of the shunt's training")
    shunt_kd_weight: float = option(0.0, "shunt: weight of Hinton KD from the original in the final training "
                                         "(0: none; the original's intended setting: 4)")
    shunt_kd_temperature: float = option(5.0, "shunt: KD temperature of the final training")
    shunt_latency_batch: int = option(128, "shunt: the batch of the second latency measurement (the first is 1)")
    shunt_latency_runs: int = option(20, "shunt: timed forward calls per latency measurement (median)")

    def validate(self, **context) -> None:
        super().validate(**context)
        fraction("shunt_flops_target", self.shunt_flops_target)
        fraction("shunt_val_fraction", self.shunt_val_fraction)
        positive(shunt_expand=self.shunt_expand, shunt_bottleneck=self.shunt_bottleneck,
                 shunt_epochs=self.shunt_epochs, shunt_lr=self.shunt_lr, shunt_batch_size=self.shunt_batch_size,
                 shunt_kd_temperature=self.shunt_kd_temperature, shunt_latency_batch=self.shunt_latency_batch,
                 shunt_latency_runs=self.shunt_latency_runs)
        if not self.shunt_kd_weight >= 0:
            raise ConfigError(f"--shunt_kd_weight must be >= 0, got {self.shunt_kd_weight}")
        self.runs()

    def runs(self) -> list:
        """`[(first, last)]` of `--shunt_blocks` (empty: placed automatically)."""
        if self.shunt_blocks is None:
            return []
        out = []
        for part in self.shunt_blocks.split(","):
            names = [p.strip() for p in part.split(":")]
            if len(names) != 2 or not all(names):
                raise ConfigError(f"--shunt_blocks {self.shunt_blocks!r}: each run is first:last (block names, "
                                  "for example block1:block6)")
            out.append(tuple(names))
        return out


@register("shunt")
class ShuntConnections(Method):
    Options = ShuntOptions
    needs_trained = True  # the original

    @classmethod
    def check_chain(cls, cfg, index):
        if cfg.steps[index].options.runs():
            _, _, defaults = nets.lookup(cfg.run.arch)
            check_runs(cfg.run.arch, defaults, cfg.steps[index].options)

    @classmethod
    def optim_defaults(cls, dataset: str) -> dict:
        del dataset
        return dict(optimizer="sgd", learning_rate=0.01, schedule="poly", poly_power=0.9, momentum=0.9,
                    warmup_epochs=0.0, weight_decay=WEIGHT_DECAY, batch_size=24, train_epoch=300)

    def stages(self):
        return [Stage("split", self.split), Stage("quotients", self.quotients), Stage("place", self.place),
                Stage("train_shunt", self.train_shunt), Stage("train_final", self.train_final),
                Stage("latency", self.latency), Stage("test", self.test)]

    # === Helpers ===
    def original(self, local: bool = False):
        return self.step.start_net(local=local)

    def read(self, name: str):
        with open(self.step.path(name)) as f:
            return json.load(f)

    def indices(self, part: str) -> np.ndarray:
        return np.asarray(self.read(SPLIT)[part], np.int64)

    def val_data(self):
        """The validation split, inference preprocessing, as `(images, labels)` batches."""
        images, labels = stages.inference_arrays(self.ctx, self.indices("val"))
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(self.step.run.val_batch_size)

    def data_fn(self, optim):
        """Training batches of the training split only."""
        return self.ctx.train_data_fn(optim, subset=self.indices("train"))

    def optim_on_split(self, **changes):
        """The step's optimisation with `changes`, in epochs of the training split (or `--steps_per_epoch`
        steps of it, if fewer)."""
        optim = self.step.optim_with(**changes)
        steps = len(self.indices("train")) // optim.batch_size
        if steps < 1:
            raise ConfigError(f"shunt: batch {optim.batch_size} exceeds the {len(self.indices('train'))} examples of "
                              "the training split")
        return dataclasses.replace(optim, steps_per_epoch=min(steps, optim.steps_per_epoch or steps))

    def inserted(self):
        return self.ctx.load_net(self.step.path(INSERTED))

    # === Stages ===
    def split(self):
        ctx, opts = self.ctx, self.options
        if not ctx.data.in_memory:
            raise ConfigError(f"--method shunt needs an in-memory dataset (CIFAR, MNIST) for its validation split; "
                              f"{ctx.info.name} is streamed")
        train, val = shunt_tasks.stratified_split(ctx.data.train_labels(), opts.shunt_val_fraction,
                                                  fold_seed(self.step.run.seed, SHUNT_SEED))
        atomic_write_json(self.step.path(SPLIT), {"train": train.tolist(), "val": val.tolist()})
        log.info("shunt: validation split of %d training images (%.0f%% of every class), %d left to train on",
                 len(val), 100 * opts.shunt_val_fraction, len(train))

    def quotients(self):
        net = self.original()
        self._check_blocks(net)
        if not any(b.residual for b in net.block_table):
            raise ConfigError(f"--method shunt: {net.arch} has no residual block to shunt")
        table = shunt_tasks.knowledge_quotients(self.ctx.strategy, net, self.val_data(), self.ctx.xla)
        atomic_write_json(self.step.path(QUOTIENTS), table)
        log.info("shunt: validation top-1 of the original %.4f; knowledge quotients (top-1 without the block):",
                 table["original"])
        for name, entry in table["blocks"].items():
            log.info("  %-16s KQ %+.4f  (top-1 %.4f)", name, entry["kq"], entry["top1"])

    def _check_blocks(self, net):
        """Named runs that the net cannot take fail here, before the shunt is trained (their names,
        order and overlap are checked with the config already: `check_chain`)."""
        if not net.block_table:
            raise ConfigError(f"--method shunt: {net.arch} has no blocks a shunt can replace")
        check_runs(net.arch, net.spec()["config"], self.options)

    def place(self):
        opts, step = self.options, self.step
        original = self.original()
        if opts.runs():
            runs = [shunts.entry(a, b, opts.shunt_arch, opts.shunt_expand, opts.shunt_bottleneck)
                    for a, b in opts.runs()]
            how = "--shunt_blocks"
        else:
            chosen = shunt_tasks.choose_run(original, self.read(QUOTIENTS), opts.shunt_flops_target, opts.shunt_arch,
                                            opts.shunt_expand, opts.shunt_bottleneck)
            runs = [shunts.entry(chosen["first"], chosen["last"], opts.shunt_arch, opts.shunt_expand,
                                 opts.shunt_bottleneck)]
            how = f"lowest summed knowledge quotient {chosen['score']:.4f} reaching {opts.shunt_flops_target:.1%}"
        spec = original.spec()
        config = {**spec["config"], "shunts": list(spec["config"].get("shunts", [])) + runs}
        # A slimmed original (`l1,shunt`) keeps its widths wherever its groups remain.
        groups = nets.build(original.arch, masked=False, **config).prunable_groups()
        widths = {k: v for k, v in spec["widths"].items() if k in groups}
        tf.random.set_seed(fold_seed(step.run.seed, SHUNT_SEED))  # the shunts' initialisation
        with self.ctx.strategy.scope():
            net = nets.build(original.arch, widths=widths, masked=False, **config)
        params, own = original.get_params(), net.get_params()
        net.set_params({k: params.get(k, v) for k, v in own.items()})
        full, cost = original.cost(), net.cost()
        atomic_write_json(step.path(PLACED), {"shunts": runs, "how": how, "flops_cut": 1 - cost.ekg_flops / full.ekg_flops,
                                              "macs_cut": 1 - cost.macs / full.macs,
                                              "params_cut": 1 - cost.params / full.params})
        save_net(net, step.path(INSERTED))
        log.info("shunt: %s (%s): %s -> %s", ", ".join(f"{r['first']}..{r['last']} (arch {r['arch']})" for r in runs),
                 how, full.describe(), cost.describe())

    def train_shunt(self):
        step, ctx, opts = self.step, self.ctx, self.options
        original, net = self.original(), self.inserted()
        runs = self.read(PLACED)["shunts"]
        done = {}
        for entry in runs:
            replaced = next(b for b in net.shunt_list if b.run.entry() == entry)
            best_path = step.path(os.path.join("train_shunt", f"{replaced.run.name}_best.pkl"))
            if not os.path.exists(best_path + ".done"):
                self._train_one(original, net, replaced, best_path)
            done.update(load_params(best_path))
        net.set_params({**net.get_params(), **done})
        save_net(net, step.path(INSERTED))

    def _train_one(self, original, net, replaced, best_path):
        step, opts = self.step, self.options
        source = shunt_tasks.input_site(original, replaced.run.first)
        task = shunt_tasks.ShuntRegress(original, net, replaced, source, replaced.run.last)
        optim = self.optim_on_split(optimizer="adam", learning_rate=opts.shunt_lr, schedule="plateau",
                                    batch_size=opts.shunt_batch_size, train_epoch=opts.shunt_epochs,
                                    warmup_epochs=0.0, weight_decay=WEIGHT_DECAY)
        keys = [f"{layer.key}/{name}:0" for layer in replaced.layers.values() for name in layer.named]
        val = self.val_data()
        mse = _feature_mse(self.ctx.strategy, task)
        best = _Best(best_path, lower=True)

        def on_epoch_end(epoch, logs):
            value = mse(val)
            logs["val_mse"] = value
            params = net.get_params()
            best.offer(epoch, value, {k: params[k] for k in keys})
            log.info("shunt %s: epoch %d validation MSE %.5f (best %.5f, epoch %d)", replaced.run.name, epoch + 1,
                     value, best.value, best.epoch + 1)

        step.train(task, os.path.join("train_shunt", replaced.run.name), optim_cfg=optim, data_fn=self.data_fn(optim),
                   on_epoch_end=on_epoch_end, evaluate=False)
        best.finish()

    def train_final(self):
        step, opts = self.step, self.options
        net = self.inserted()
        optim = self.optim_on_split()
        if opts.shunt_kd_weight > 0:
            task = Distill(net, self.original(), opts.shunt_kd_weight, opts.shunt_kd_temperature, "hinton")
        else:
            task = Classify(net)
        evaluator = Evaluator(self.ctx.strategy, net, self.ctx.xla)
        val = self.val_data()
        best = _Best(step.path(os.path.join("train_final", "best.pkl")), lower=False)

        def on_epoch_end(epoch, logs):
            value = evaluator.evaluate(val)["top1"]
            logs["val_top1"] = value
            best.offer(epoch, value, net.get_params())
            log.info("shunt final: epoch %d validation top-1 %.4f (best %.4f, epoch %d)", epoch + 1, value,
                     best.value, best.epoch + 1)

        step.train(task, "train_final", optim_cfg=optim, data_fn=self.data_fn(optim), on_epoch_end=on_epoch_end)
        best.finish()
        net.set_params(load_params(best.path))
        step.save(net)

    def latency(self):
        opts, ctx = self.options, self.ctx
        shape = ctx.info.image_shape
        report = {}
        for name, path in (("original", self.step.input), ("final", self.step.output)):
            net = ctx.load_net(path, local=True)
            report[name] = {f"batch_{b}_ms": measure_latency(net, b, shape, opts.shunt_latency_runs, False)
                            for b in sorted({1, opts.shunt_latency_batch})}
        report["speedup"] = {k: report["original"][k] / report["final"][k] for k in report["original"]}
        atomic_write_json(self.step.path(LATENCY), report)
        log.info("shunt latency (ms per forward call, median of %d): %s", opts.shunt_latency_runs,
                 "; ".join(f"{k}: original {report['original'][k]:.2f}, final {report['final'][k]:.2f}"
                           for k in report["original"]))

    def test(self):
        step, ctx = self.step, self.ctx
        results = stages.test(step)
        metrics = ("top1", "top5", "loss")
        summary = {"final": {k: results[k] for k in (*metrics, "params", "macs", "ekg_params", "ekg_flops")}}
        for name, path in (("original", step.input), ("shunt_inserted", step.path(INSERTED))):
            net = ctx.load_net(path)
            summary[name] = {**{k: float(v) for k, v in ctx.evaluate(net).items() if k in metrics},
                             **net.cost().as_dict()}
        latency = self.read(LATENCY)
        for name in ("original", "final"):
            summary[name]["latency"] = latency[name]
        placed = self.read(PLACED)
        results.update({"shunts": placed["shunts"], "placement": placed["how"], "nets": summary,
                        "flops_cut": placed["flops_cut"], "macs_cut": placed["macs_cut"],
                        "top1_drop": summary["original"]["top1"] - summary["final"]["top1"]})
        atomic_write_json(step.path(stages.RESULTS), results)
        for name, entry in summary.items():
            log.info("shunt summary %-15s top-1 %.4f | %.2f MFLOPs (EKG), %.2f MMACs, %.3f M params%s", name,
                     entry["top1"], entry["ekg_flops"] / 1e6, entry["macs"] / 1e6, entry["params"] / 1e6,
                     "" if "latency" not in entry else " | latency " + ", ".join(
                         f"{k} {v:.2f}" for k, v in entry["latency"].items()))


def check_runs(arch: str, config: dict, opts: ShuntOptions) -> None:
    """ConfigError naming the blocks and the net if `--shunt_blocks` cannot be built on `arch` with
    `config`: unknown blocks, a run out of order, overlapping runs, a stride change the shunt
    architecture cannot make."""
    existing = list(config.get("shunts", []))
    entries = [shunts.entry(a, b, opts.shunt_arch, opts.shunt_expand, opts.shunt_bottleneck) for a, b in opts.runs()]
    try:
        nets.build(arch, masked=False, **{**config, "shunts": existing + entries})
    except ConfigError as err:
        raise ConfigError(f"--shunt_blocks {opts.shunt_blocks}: {err}") from None


def _feature_mse(strategy, task):
    """`mse(dataset) -> float`: the shunt's mean validation MSE, inference mode, one trace."""

    def replica(images):
        x, target = task.features(images)
        y = task.predict(x, training=False)
        err = tf.reduce_mean(tf.square(y - target), axis=[1, 2, 3])
        return tf.stack([tf.reduce_sum(tf.cast(err, tf.float64)), tf.cast(tf.shape(err)[0], tf.float64)])

    step = fresh_function(lambda images: strategy.reduce("SUM", strategy.run(replica, args=(images,)), axis=None))

    def mse(dataset):
        total = np.zeros(2)
        for images, _ in strategy.experimental_distribute_dataset(dataset):
            total += step(images).numpy()
        return float(total[0] / max(total[1], 1.0))

    return mse


class _Best:
    """The best weights of a training by a validation value, kept in `path` (atomically, with
    `path.json` holding the value and epoch, so a resumed training compares with it); `finish`
    marks the training done (`path.done`)."""

    def __init__(self, path: str, lower: bool):
        self.path, self.lower = path, lower
        self.meta = path + ".json"
        self.value, self.epoch = (float("inf") if lower else -float("inf")), -1
        if os.path.exists(self.meta):
            with open(self.meta) as f:
                saved = json.load(f)
            self.value, self.epoch = saved["value"], saved["epoch"]

    def offer(self, epoch: int, value: float, params: dict) -> None:
        if (value < self.value) if self.lower else (value > self.value):
            self.value, self.epoch = float(value), int(epoch)
            save_params(self.path, params)
            atomic_write_json(self.meta, {"value": self.value, "epoch": self.epoch})

    def finish(self) -> None:
        if self.epoch < 0:
            raise ConfigError(f"{self.path}: the training ended without a validation measurement")
        atomic_write_json(self.path + ".done", {"value": self.value, "epoch": self.epoch})
