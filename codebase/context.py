"""RunContext: what every stage of every method is given.

It builds the strategy, the data and the nets from the frozen config, and offers `train()`,
the one way a method trains anything: the engine's Trainer and loop with the run's strategy,
XLA choice, accumulation, schedule and checkpoints. Methods supply a loss and, if they need
it, a gradient transform; they never touch the strategy, XLA or accumulation themselves.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

import nets
from codebase.config import Config, dataset_options
from dataloader import build_dataset
from op_utils import loop, optim, schedules
from op_utils.strategy import make_strategy, resolve_xla
from op_utils.trainer import Trainer, softmax_cross_entropy
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger
from utils.params_io import load_params, save_params

log = get_logger(__name__)


def spec_path(params_path: str) -> str:
    """The width-spec file saved beside a params pickle: `x.pkl` -> `x.arch.json`."""
    return os.path.splitext(params_path)[0] + ".arch.json"


def save_net(net, path: str) -> None:
    """Write the params pickle and, beside it, the spec that rebuilds the architecture."""
    save_params(path, net.get_params())
    atomic_write_json(spec_path(path), net.spec())


def load_net(arch: str, path: str, masked: bool = False, **config):
    """Rebuild a (possibly slimmed) net from a params pickle, with or without its spec file."""
    params = load_params(path)
    spec_file = spec_path(path)
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            spec = json.load(f)
        if nets.lookup(spec["arch"])[0] != nets.lookup(arch)[0]:
            raise ConfigError(f"{path} holds a {spec['arch']} (see {spec_file}), not --arch {arch}")
        net = nets.build(spec["arch"], widths=spec["widths"], masked=masked, **{**spec["config"], **config})
        if spec.get("compactors"):
            net.add_compactors(spec["compactors"])  # a ResRep net saved while training
        net.set_params(params)
        return net
    return nets.build_from_params(arch, params, masked=masked, **config)


class RunContext:
    """Strategy, data and helpers for one run (see the module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.strategy = make_strategy(cfg.gpu_id, cfg.num_replicas)
        self.xla = resolve_xla(cfg.compile)
        self.data = build_dataset(cfg.dataset, cfg.data_path, **dataset_options(cfg.dataset, cfg.image_size))
        self.info = self.data.info
        os.makedirs(cfg.train_path, exist_ok=True)

    # === Nets ===
    def net_config(self) -> dict:
        return dict(num_classes=self.info.num_classes, input_size=self.info.image_shape[0])

    def build_net(self, masked: bool = False, widths=None):
        """The configured architecture, built in the strategy's scope."""
        with self.strategy.scope():
            return nets.build(self.cfg.arch, widths=widths, masked=masked, **self.net_config())

    def load_net(self, path: str, masked: bool = False):
        with self.strategy.scope():
            return load_net(self.cfg.arch, path, masked=masked, **self.net_config())

    def copy_net(self, net, masked: bool = False, local: bool = False):
        """A new net of the same architecture and widths holding `net`'s params.

        `local=True` builds it outside the strategy (plain variables on the default device), for
        host-driven single-device work such as a search.
        """
        with contextlib.nullcontext() if local else self.strategy.scope():
            new = nets.build_from_spec(net.spec(), masked=masked)
            if net.compactors:
                new.add_compactors(list(net.compactors))
        new.set_params(net.get_params())
        return new

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.train_path, name)

    # === Training and evaluation ===
    def steps_per_epoch(self) -> int:
        return self.cfg.steps_per_epoch or self.data.steps_per_epoch(self.cfg.batch_size)

    def make_optimizer(self, epochs: int, learning_rate: float | None = None, steps_per_epoch: int | None = None,
                       constant: bool = False, overrides=None):
        """The run's optimizer and schedule; `overrides` gives variables their own hyperparameters
        (see `op_utils.optim.Optimizer`)."""
        cfg = self.cfg
        steps_per_epoch = steps_per_epoch or self.steps_per_epoch()
        total = max(1, epochs * steps_per_epoch)
        lr = learning_rate if learning_rate is not None else cfg.learning_rate
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        if constant:
            schedule = lr
        elif cfg.schedule == "cosine":
            schedule = schedules.Cosine(lr, total, warmup_steps=warmup)
        else:
            schedule = schedules.StepDecay(lr, total, cfg.decay_points, cfg.decay_rate, warmup_steps=warmup)
        if cfg.optimizer == "adam":
            return optim.Adam(schedule, weight_decay=cfg.weight_decay, overrides=overrides)
        return optim.SGD(schedule, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay,
                         overrides=overrides)

    def trainer(self, net, epochs: int, loss_fn=softmax_cross_entropy, grad_transform=None,
                learning_rate: float | None = None, steps_per_epoch: int | None = None,
                constant_lr: bool = False, optimizer_overrides=None, recompute: bool | None = None) -> Trainer:
        """A trainer for `net`; `recompute` (default: `--recompute`) is passed to `net.set_recompute`."""
        with self.strategy.scope():
            optimizer = self.make_optimizer(epochs, learning_rate, steps_per_epoch, constant_lr, optimizer_overrides)
        net.set_recompute(self.cfg.recompute if recompute is None else recompute)
        return Trainer(self.strategy, net, optimizer, global_batch_size=self.cfg.batch_size,
                       accum=self.cfg.accum, loss_fn=loss_fn, grad_transform=grad_transform, xla=self.xla)

    def train_data_fn(self, augment: bool = True):
        cfg, data = self.cfg, self.data

        def fn(epoch, ctx):
            return data.train(ctx.get_per_replica_batch_size(cfg.batch_size), epoch, cfg.seed, augment=augment,
                              num_shards=ctx.num_input_pipelines, shard_index=ctx.input_pipeline_id)

        return fn

    def train(self, net, epochs: int, stage: str, loss_fn=softmax_cross_entropy, grad_transform=None,
              train_data_fn=None, on_epoch_end=None, learning_rate: float | None = None,
              steps_per_epoch: int | None = None, constant_lr: bool = False, optimizer_overrides=None,
              on_step_end=None, recompute: bool | None = None) -> dict:
        """Train `net` for `epochs` epochs; checkpoints and logs go to `<train_path>/<stage>`.

        `optimizer_overrides` and `on_step_end` are passed to the optimizer and to `loop.fit`,
        `recompute` to `trainer`.
        """
        steps_per_epoch = steps_per_epoch or self.steps_per_epoch()
        trainer = self.trainer(net, epochs, loss_fn, grad_transform, learning_rate, steps_per_epoch, constant_lr,
                               optimizer_overrides, recompute)
        return loop.fit(trainer, train_data_fn or self.train_data_fn(), epochs=epochs,
                        steps_per_epoch=steps_per_epoch, train_path=self.path(stage),
                        eval_data=self.data.test(self.cfg.val_batch_size), resume=self.cfg.resume,
                        ckpt_every_steps=self.cfg.ckpt_every_steps, on_epoch_end=on_epoch_end,
                        log_every_steps=self.cfg.do_log, on_step_end=on_step_end)

    def evaluate(self, net) -> dict:
        """Top-1, top-5 and loss on the test set with moving statistics."""
        trainer = self.trainer(net, 1)
        return trainer.evaluate(self.data.test(self.cfg.val_batch_size))

    def describe(self, net) -> str:
        return f"{self.cfg.arch}: {net.cost().describe()}"


def finite(logs: dict) -> dict:
    """Plain floats for JSON."""
    return {k: float(v) if isinstance(v, (float, np.floating, int, np.integer)) else v for k, v in logs.items()}
