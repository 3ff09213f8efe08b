"""RunContext and StepContext: what every stage of every method is given.

`RunContext` builds the strategy, the data and the nets from the frozen config and offers
`train()`, the one way a method trains anything: the engine's Trainer and loop with the run's
strategy, XLA choice, accumulation, schedule and checkpoints. Methods supply a task
(`op_utils.task`: what is trained, its loss, gradient transform and optimizer overrides) and an
`OptimConfig`; they never touch the strategy, XLA or accumulation themselves.

`StepContext` is one step of the chain: its folder, options, optimisation, the net it starts
from (the previous step's output, `--trained_param`, or a fresh net) and where it writes its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

import nets
from nets.base import Net
from codebase.artifacts import load_net, read_spec, save_net
from codebase.config import Config, OptimConfig, Step, dataset_options
from dataloader import build_dataset
from op_utils import loop, optim, schedules
from op_utils.evaluate import Evaluator
from op_utils.strategy import make_strategy, resolve_xla
from op_utils.task import Classify
from op_utils.trainer import Trainer
from utils.devices import describe_devices, use_precision, use_thread_pools
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

OUTPUT = "trained_params.pkl"  # every step's output net, and the run's final one at the top


class RunContext:
    """Strategy, data and helpers for one run (see the module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        run = cfg.run
        use_thread_pools(run.intra_op_threads, run.inter_op_threads)  # before the runtime starts
        self.strategy = make_strategy(run.gpu_id, run.num_replicas)
        self.xla = resolve_xla(run.compile)
        use_precision(run.precision)
        options = dataset_options(run.dataset, run.image_size)
        if run.cifar_padding != "reflect":
            options["padding"] = run.cifar_padding
        self.data = build_dataset(run.dataset, run.data_path, **options)
        self.info = self.data.info
        self.devices = describe_devices(self.strategy)
        os.makedirs(run.train_path, exist_ok=True)

    # === Nets ===
    def net_config(self) -> dict:
        return dict(num_classes=self.info.num_classes, input_size=self.info.image_shape[0])

    def build_net(self, masked: bool = False, widths=None, arch: str | None = None):
        """The configured architecture (or `arch`), built in the strategy's scope."""
        with self.strategy.scope():
            return nets.build(arch or self.cfg.run.arch, widths=widths, masked=masked, **self.net_config())

    def load_net(self, path: str, masked: bool = False, arch: str | None = None, local: bool = False,
                 any_arch: bool = False):
        """A saved net (params pickle, spec, transform state), in the strategy's scope unless `local`.

        It must be an `arch` (default `--arch`); with `any_arch`, a spec beside the pickle decides
        (a teacher of another architecture), and `arch` or `--arch` only rebuilds a pickle without one.
        A `.npz` of foreign weights is imported with the data's mean and std (`artifacts.import_net`).
        """
        if any_arch and arch is None and read_spec(path) is not None:
            expected = None
        else:
            expected = arch or self.cfg.run.arch
        with contextlib.nullcontext() if local else self.strategy.scope():
            return load_net(expected, path, masked=masked, data_stats=(self.info.mean, self.info.std),
                            **self.net_config())

    def copy_net(self, net, masked: bool = False, local: bool = False):
        """A new net of the same architecture, widths and transforms holding `net`'s params.

        `local=True` builds it outside the strategy (plain variables on the default device), for
        host-driven single-device work such as a search.
        """
        with contextlib.nullcontext() if local else self.strategy.scope():
            new = nets.build_from_spec(net.spec(), masked=masked)
        new.set_params(net.get_params())
        new.load_transform_state(net.transform_state())
        return new

    # === Training and evaluation ===
    def steps_per_epoch(self, optim_cfg: OptimConfig) -> int:
        steps = optim_cfg.steps_per_epoch or self.data.steps_per_epoch(optim_cfg.batch_size)
        if steps < 1:
            raise ConfigError(f"--batch_size {optim_cfg.batch_size} exceeds the {self.info.num_train} training "
                              "examples: no step in an epoch")
        return steps

    def make_optimizer(self, optim_cfg: OptimConfig, steps_per_epoch: int):
        """The step's optimizer and schedule over `optim_cfg.train_epoch` epochs."""
        total = max(1, optim_cfg.train_epoch * steps_per_epoch)
        lr = optim_cfg.learning_rate
        warmup = int(optim_cfg.warmup_epochs * steps_per_epoch)
        if optim_cfg.schedule == "constant":
            schedule = lr
        elif optim_cfg.schedule == "cosine":
            schedule = schedules.Cosine(lr, total, warmup_steps=warmup)
        elif optim_cfg.schedule == "poly":
            schedule = schedules.Poly(lr, total, steps_per_epoch, optim_cfg.poly_power, warmup_steps=warmup)
        elif optim_cfg.schedule == "plateau":
            schedule = schedules.Plateau(lr, optim_cfg.plateau_factor, optim_cfg.plateau_patience,
                                         optim_cfg.plateau_min_lr)
        else:
            schedule = schedules.StepDecay(lr, total, optim_cfg.decay_points, optim_cfg.decay_rate,
                                           warmup_steps=warmup)
        if optim_cfg.optimizer == "adam":
            return optim.Adam(schedule, weight_decay=optim_cfg.weight_decay)
        return optim.SGD(schedule, momentum=optim_cfg.momentum, nesterov=True, weight_decay=optim_cfg.weight_decay)

    def trainer(self, task, optim_cfg: OptimConfig, steps_per_epoch: int, recompute: bool | None = None) -> Trainer:
        """A trainer for `task`; `recompute` (default: `--recompute`) is passed to the trained net."""
        with self.strategy.scope():
            optimizer = self.make_optimizer(optim_cfg, steps_per_epoch)
        model = task.eval_model
        if model is not None and hasattr(model, "set_recompute"):
            model.set_recompute(self.cfg.run.recompute if recompute is None else recompute)
        return Trainer(self.strategy, task, optimizer, global_batch_size=optim_cfg.batch_size,
                       accum=self.cfg.run.accum, xla=self.xla)

    def train_data_fn(self, optim_cfg: OptimConfig, augment: bool = True, subset=None):
        """`loop.fit`'s data function: epochs of training batches (only the positions `subset` of an
        in-memory training set, when given: a split held out for validation or a search's reward)."""
        run, data = self.cfg.run, self.data
        extra = {} if subset is None else {"subset": subset}

        def fn(epoch, ctx):
            return data.train(ctx.get_per_replica_batch_size(optim_cfg.batch_size), epoch, run.seed, augment=augment,
                              num_shards=ctx.num_input_pipelines, shard_index=ctx.input_pipeline_id, **extra)

        return fn

    def train(self, task, optim_cfg: OptimConfig, folder: str, data_fn=None, on_epoch_end=None, on_step_end=None,
              recompute: bool | None = None, evaluate: bool = True) -> dict:
        """Train `task` for `optim_cfg.train_epoch` epochs; checkpoints and TensorBoard go to `folder`.

        A plain net is trained as `Classify(net)`. `on_epoch_end` / `on_step_end` are `op_utils.loop.fit`'s
        hooks; `evaluate=False` skips the per-epoch test-set evaluation (tasks without a classifier).
        """
        if isinstance(task, Net):
            task = Classify(task)
        steps_per_epoch = self.steps_per_epoch(optim_cfg)
        trainer = self.trainer(task, optim_cfg, steps_per_epoch, recompute)
        eval_data = self.data.test(self.cfg.run.val_batch_size) if evaluate and task.eval_model is not None else None
        schedule = trainer.optimizer.learning_rate
        if isinstance(schedule, schedules.Plateau):
            on_epoch_end = _plateau_hook(schedule, on_epoch_end)
        return loop.fit(trainer, data_fn or self.train_data_fn(optim_cfg), epochs=optim_cfg.train_epoch,
                        steps_per_epoch=steps_per_epoch, train_path=folder, eval_data=eval_data,
                        resume=self.cfg.run.resume, ckpt_every_steps=self.cfg.run.ckpt_every_steps,
                        on_epoch_end=on_epoch_end, log_every_steps=self.cfg.run.do_log, on_step_end=on_step_end)

    def tuner(self, task, optim_cfg: OptimConfig, data_fn=None) -> loop.Tuner:
        """A `loop.Tuner` of `task`: a few steps at a time with this run's strategy, XLA and
        accumulation, traced once for every call (a search's per-candidate tuning)."""
        if isinstance(task, Net):
            task = Classify(task)
        trainer = self.trainer(task, optim_cfg, self.steps_per_epoch(optim_cfg))
        return loop.Tuner(trainer, data_fn or self.train_data_fn(optim_cfg))

    def evaluate(self, net) -> dict:
        """Top-1, top-5 and loss on the test set with moving statistics (no optimizer involved)."""
        return Evaluator(self.strategy, net, self.xla).evaluate(self.data.test(self.cfg.run.val_batch_size))

    def describe(self, net) -> str:
        return f"{net.arch}: {net.cost().describe()}"


class StepContext:
    """One step of the chain (see the module docstring).

    Attributes:
        ctx: the RunContext.
        step: the step's config (`name`, `method`, `options`, `optim`).
        index: its position in the chain (0 is the baseline when there is one).
        input: the params pickle of the net it starts from, or None (build a fresh net).
        origin: the params pickle the whole chain started from (`--trained_param` or the
            baseline's output), or None; the unpruned teacher of a distillation step.
        next_trains: whether the following step trains the net this step produces.
        dir: the step's folder, `<train_path>/<name>`.
    """

    def __init__(self, ctx: RunContext, step: Step, index: int, input_path: str | None, origin: str | None,
                 next_trains: bool):
        self.ctx, self.step, self.index = ctx, step, index
        self.input, self.origin, self.next_trains = input_path, origin, next_trains
        self.options, self.optim = step.options, step.optim
        self.run = ctx.cfg.run
        self.dir = os.path.join(self.run.train_path, step.name)
        os.makedirs(self.dir, exist_ok=True)

    @property
    def output(self) -> str:
        return self.path(OUTPUT)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start_net(self, masked: bool = False, local: bool = False):
        """The net this step starts from: its input if it has one, else a fresh net."""
        if self.input is not None:
            return self.ctx.load_net(self.input, masked=masked, local=local)
        if local:
            return nets.build(self.run.arch, masked=masked, **self.ctx.net_config())
        return self.ctx.build_net(masked=masked)

    def save(self, net, name: str = OUTPUT) -> str:
        path = self.path(name)
        save_net(net, path)
        return path

    def train(self, task, stage: str, optim_cfg: OptimConfig | None = None, **kwargs) -> dict:
        """`RunContext.train` with this step's optimisation (or `optim_cfg`), into `<step>/<stage>`."""
        return self.ctx.train(task, optim_cfg or self.optim, self.path(stage), **kwargs)

    def optim_with(self, **changes) -> OptimConfig:
        return dataclasses.replace(self.optim, **changes)

    def optim_for_steps(self, steps: int, **changes) -> OptimConfig:
        """This step's optimisation with `changes`, for `steps` optimizer steps in epochs no longer than
        this step's (the training set's, or `--steps_per_epoch`), each on its own epoch of data. The
        count is rounded up by fewer steps than it takes epochs (10,000 steps of 390-step epochs: 26
        epochs of 385 steps)."""
        epochs = -(-int(steps) // self.ctx.steps_per_epoch(self.optim))
        return self.optim_with(train_epoch=epochs, steps_per_epoch=-(-int(steps) // epochs), **changes)


def _plateau_hook(schedule, on_epoch_end):
    """`on_epoch_end` that first feeds the epoch's training loss to a plateau schedule (before the
    epoch's checkpoint, which saves the schedule's state with the optimizer)."""
    def hook(epoch, logs):
        if schedule.update(float(logs.get("loss", float("nan")))):
            log.info("plateau: learning rate reduced to %.3g after epoch %d", float(schedule.rate.numpy()), epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)

    return hook


def finite(logs: dict) -> dict:
    """Plain Python numbers for JSON (integers stay integers)."""
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) if isinstance(v, (float, np.floating)) else v
            for k, v in logs.items()}
