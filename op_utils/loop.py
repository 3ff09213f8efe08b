"""The outer training loop: epochs, evaluation, summaries, checkpoints and resumption.

Wiring, from a caller's point of view::

    strategy = make_strategy(gpu_id, num_replicas)
    with strategy.scope():
        model = build_model()
    trainer = Trainer(strategy, model, SGD(StepDecay(0.01, total_steps), weight_decay=5e-4),
                      global_batch_size=128, loss_fn=my_loss, xla=resolve_xla("auto"))

    def train_data(epoch, ctx):       # deterministic given the epoch
        ds = make_examples(seed=fold_seed(seed, epoch))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(ctx.get_per_replica_batch_size(128), drop_remainder=True)

    logs = fit(trainer, train_data, epochs=100, steps_per_epoch=390,
               train_path="runs/x", eval_data=test_ds, resume=True)

Resumption: every checkpoint holds the weights, optimizer slots, global step, running
metric sums and the data position (epoch, steps done in it). On ``resume=True`` the
latest checkpoint is restored, that epoch's dataset is rebuilt with ``train_data_fn``
and the consumed batches are skipped, so a resumed run ends exactly where an
uninterrupted one does (provided ``train_data_fn`` is deterministic given the epoch).
"""
import math
import os
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from op_utils.checkpoint import Checkpointer, is_chief
from op_utils.trainer import Trainer
from utils.errors import ConfigError, DataError, TrainingError
from utils.logs import Progress, Scalars, get_logger

log = get_logger(__name__)

TrainDataFn = Callable[[int, tf.distribute.InputContext], tf.data.Dataset]
EpochEndFn = Callable[[int, dict[str, float]], None]
StepEndFn = Callable[[int], Mapping[str, float] | None]


def _positive(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_batched(ds: tf.data.Dataset, expected: int) -> None:
    for spec in tf.nest.flatten(ds.element_spec):
        size = spec.shape[0] if spec.shape.rank else None
        if size != expected:
            raise ConfigError(
                f"train_data_fn must yield batches of the per-replica batch size {expected} "
                f"with a static leading dimension (batch with drop_remainder=True); "
                f"got element shape {spec.shape}"
            )


def _distributed_epoch(trainer: Trainer, train_data_fn: TrainDataFn, epoch: int, skip: int):
    """Distributes epoch ``epoch``'s data, skipping the first ``skip`` steps' batches."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = train_data_fn(epoch, context)
        _check_batched(ds, context.get_per_replica_batch_size(trainer.global_batch_size))
        if skip:
            # Each input pipeline feeds this many replicas, one batch each per step.
            per_step = context.num_replicas_in_sync // context.num_input_pipelines
            ds = ds.skip(skip * per_step)
        return ds

    return trainer.strategy.distribute_datasets_from_function(dataset_fn)


class _Silent:
    """Stands in for ``Progress`` on non-chief workers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def update(self, n: int = 1, **postfix) -> None:
        del n, postfix


def fit(
    trainer: Trainer,
    train_data_fn: TrainDataFn,
    *,
    epochs: int,
    steps_per_epoch: int,
    train_path: str,
    eval_data: tf.data.Dataset | None = None,
    resume: bool = False,
    ckpt_every_steps: int | None = None,
    on_epoch_end: EpochEndFn | None = None,
    log_every_steps: int = 100,
    max_to_keep: int = 2,
    on_step_end: StepEndFn | None = None,
) -> dict[str, float]:
    """Trains for ``epochs`` epochs of ``steps_per_epoch`` steps, evaluating every epoch.

    Each epoch: build the epoch's data, run the steps (stopping with ``TrainingError`` on
    a non-finite loss), evaluate on ``eval_data`` with moving statistics, write
    TensorBoard scalars, call ``on_epoch_end(epoch, logs)`` and save a checkpoint. With
    ``ckpt_every_steps`` it also saves within epochs, whenever the global step is a
    multiple of it.

    The position (epoch, step in epoch, global step) lives in the trainer and its
    checkpoints, so each run (or stage of a pipeline) takes a fresh ``Trainer``.

    Outputs under ``train_path``: ``ckpt/`` (the last ``max_to_keep`` checkpoints,
    ``ckpt-<global step>``) and ``tensorboard/`` (tags ``train/loss``, ``train/top1``,
    ``train/lr``, ``train/<extra>``, ``eval/top1``, ``eval/top5``, ``eval/loss``).

    Args:
        trainer: The trainer to run.
        train_data_fn: ``(epoch, input_context) -> dataset`` of per-replica batches
            (``input_context.get_per_replica_batch_size(global_batch)``, with
            ``drop_remainder=True``), deterministic given the epoch, sharded with
            ``input_context.num_input_pipelines`` / ``input_pipeline_id``, and holding at
            least ``steps_per_epoch`` steps of batches.
        epochs: Total number of epochs (a resumed run counts those already done).
        steps_per_epoch: Optimizer steps per epoch.
        train_path: Output folder.
        eval_data: Optional plain batched dataset of ``(images, labels)``.
        resume: Continue from the latest checkpoint in ``train_path/ckpt`` (starts fresh,
            with a log line, if there is none).
        ckpt_every_steps: Also checkpoint mid-epoch every this many global steps.
        on_epoch_end: Called as ``on_epoch_end(epoch, logs)`` (0-based epoch) after
            evaluation and before the epoch's checkpoint, so state it changes is saved.
        log_every_steps: Interval of the step-level TensorBoard scalars.
        max_to_keep: Number of checkpoints kept.
        on_step_end: Called as ``on_step_end(global_step)`` after every step, before any
            checkpoint of that step, so variables it assigns on the host (e.g. masks) are
            used by the next step and saved with the step. It may return scalars, written
            to TensorBoard as ``train/<name>`` with the step scalars.

    Returns:
        The last epoch's logs: ``epoch`` (epochs completed), ``step``, ``loss``, ``top1``,
        ``lr``, the loss extras (mean over the steps this process ran in that epoch), and
        ``eval_top1``/``eval_top5``/``eval_loss``/``eval_count`` when ``eval_data`` is set.

    Raises:
        ConfigError: For bad arguments, or checkpoints already in ``train_path/ckpt``
            without ``resume``.
        DataError: If ``train_data_fn`` yields fewer batches than an epoch needs.
        TrainingError: If the loss becomes NaN or infinite (no checkpoint is written
            after that step).
    """
    controller = Controller(
        trainer, train_data_fn, epochs=epochs, steps_per_epoch=steps_per_epoch,
        train_path=train_path, eval_data=eval_data, ckpt_every_steps=ckpt_every_steps,
        on_epoch_end=on_epoch_end, log_every_steps=log_every_steps, max_to_keep=max_to_keep,
        on_step_end=on_step_end)
    controller.restore_or_start(resume)
    return controller.run()


class Controller:
    """Runs the epochs of ``fit``; see there for the arguments.

    Split out so that each phase of the loop (start-up, one epoch, the end of an epoch)
    reads on its own; most callers just use ``fit``.
    """

    def __init__(self, trainer: Trainer, train_data_fn: TrainDataFn, *, epochs: int,
                 steps_per_epoch: int, train_path: str,
                 eval_data: tf.data.Dataset | None = None,
                 ckpt_every_steps: int | None = None, on_epoch_end: EpochEndFn | None = None,
                 log_every_steps: int = 100, max_to_keep: int = 2,
                 on_step_end: StepEndFn | None = None) -> None:
        self.trainer = trainer
        self.train_data_fn = train_data_fn
        self.epochs = _positive("epochs", epochs)
        self.steps_per_epoch = _positive("steps_per_epoch", steps_per_epoch)
        self.ckpt_every_steps = _positive("ckpt_every_steps", ckpt_every_steps,
                                          allow_none=True)
        self.log_every_steps = _positive("log_every_steps", log_every_steps)
        self.train_path = os.fspath(train_path)
        self.eval_data = eval_data
        self.on_epoch_end = on_epoch_end
        self.on_step_end = on_step_end
        self.chief = is_chief(trainer.strategy)
        self.ckpt = Checkpointer(trainer.checkpoint, os.path.join(self.train_path, "ckpt"),
                                 trainer.strategy, max_to_keep=max_to_keep)

    def restore_or_start(self, resume: bool) -> None:
        """Restores the latest checkpoint if ``resume``; refuses to mix with old runs."""
        trainer = self.trainer
        if resume:
            restored = self.ckpt.restore_latest()
            if restored is None:
                log.info("resume: no checkpoint in %s; starting fresh", self.ckpt.directory)
            else:
                log.info("resumed from %s (epoch %d, step %d of it, global step %d)",
                         restored, int(trainer.epoch.numpy()) + 1,
                         int(trainer.step_in_epoch.numpy()), int(trainer.global_step.numpy()))
        elif self.ckpt.latest is not None:
            raise ConfigError(f"{self.ckpt.directory} already holds checkpoints; resume, "
                              "or use a new train path")

    def run(self) -> dict[str, float]:
        """Trains the remaining epochs and returns the last epoch's logs."""
        trainer = self.trainer
        scalars = Scalars(os.path.join(self.train_path, "tensorboard")) if self.chief else None
        logs: dict[str, float] = {}
        try:
            while int(trainer.epoch.numpy()) < self.epochs:
                epoch = int(trainer.epoch.numpy())
                logs = self._train_epoch(epoch, scalars)
                self._end_epoch(epoch, logs, scalars)
            if not logs:
                log.info("nothing to train: %d of %d epochs already done",
                         int(trainer.epoch.numpy()), self.epochs)
                logs = {"epoch": int(trainer.epoch.numpy()),
                        "step": int(trainer.global_step.numpy())}
                logs.update(self._evaluate())
        finally:
            if scalars is not None:
                scalars.close()
        return logs

    def _evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        return {f"eval_{key}": value for key, value in
                self.trainer.evaluate(self.eval_data).items()}

    def _train_epoch(self, epoch: int, scalars: Scalars | None) -> dict[str, float]:
        """Runs the remaining steps of one epoch and returns its training logs."""
        trainer, steps_per_epoch = self.trainer, self.steps_per_epoch
        start = int(trainer.step_in_epoch.numpy())
        if start > steps_per_epoch:
            raise ConfigError(
                f"the checkpoint is at step {start} of epoch {epoch + 1}, past "
                f"steps_per_epoch={steps_per_epoch}; resume with the original steps_per_epoch"
            )
        if start == 0:
            trainer.reset_metrics()
        iterator = iter(_distributed_epoch(trainer, self.train_data_fn, epoch, start))
        extra_sums: dict[str, float] = {}
        progress = _Silent() if scalars is None else Progress(
            total=steps_per_epoch - start, desc=f"epoch {epoch + 1}/{self.epochs}")
        with progress:
            for step_in_epoch in range(start, steps_per_epoch):
                try:
                    dist_batch = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    raise DataError(
                        f"train_data_fn(epoch={epoch}) ran out of data after {step_in_epoch} "
                        f"of {steps_per_epoch} steps"
                    ) from None
                out = trainer.train_step(dist_batch)
                global_step = int(trainer.global_step.numpy())
                self._check_finite(float(out["loss"]), float(out["grad_norm"]), global_step, epoch)
                trainer.step_in_epoch.assign(step_in_epoch + 1)
                if trainer.task.after_step(global_step):
                    trainer.optimizer.reset()
                hooked = self.on_step_end(global_step) if self.on_step_end is not None else None
                extras = {key: float(value) for key, value in out.items()
                          if key not in ("loss", "top1")}
                for key, value in extras.items():
                    extra_sums[key] = extra_sums.get(key, 0.0) + value
                running = trainer.metrics()
                progress.update(1, loss=running["loss"], **({"acc": running["top1"]} if "top1" in running else {}))
                if scalars is not None and global_step % self.log_every_steps == 0:
                    values = {f"train/{key}": value for key, value in running.items()}
                    values["train/lr"] = _last_lr(trainer)
                    values.update({f"train/{key}": value for key, value in extras.items()})
                    values.update({f"train/{key}": value for key, value in (hooked or {}).items()})
                    scalars.scalars(values, global_step)
                # The end of an epoch is saved by _end_epoch, after evaluation.
                if self.ckpt_every_steps and global_step % self.ckpt_every_steps == 0 \
                        and step_in_epoch + 1 < steps_per_epoch:
                    self.ckpt.save(global_step)

        steps_run = steps_per_epoch - start
        logs = {"epoch": epoch + 1, "step": int(trainer.global_step.numpy()),
                **trainer.metrics(), "lr": _last_lr(trainer)}
        logs.update({key: total / steps_run for key, total in extra_sums.items()})
        return logs

    def _check_finite(self, loss: float, grad_norm: float, global_step: int, epoch: int) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        # Raised before any checkpoint of this step, so the last one stays valid.
        where = self.ckpt.latest or f"{self.ckpt.directory} (none written yet)"
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        raise TrainingError(
            f"{what} is {'NaN' if math.isnan(value) else 'inf'} at step {global_step} "
            f"(epoch {epoch + 1}); last checkpoint kept at {where}"
        )

    def _end_epoch(self, epoch: int, logs: dict[str, float], scalars: Scalars | None) -> None:
        """Evaluates, records, calls the hook and checkpoints; updates ``logs`` in place."""
        logs.update(self._evaluate())
        if scalars is not None:
            values = {f"train/epoch_{key}": logs[key] for key in ("loss", "top1") if key in logs}
            values.update({f"eval/{key}": logs[f"eval_{key}"]
                           for key in ("top1", "top5", "loss") if f"eval_{key}" in logs})
            scalars.scalars(values, logs["step"])
            scalars.flush()
        log.info("epoch %d/%d: %s", epoch + 1, self.epochs, _format(logs))
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, logs)
        self.trainer.epoch.assign(epoch + 1)
        self.trainer.step_in_epoch.assign(0)
        self.ckpt.save(logs["step"])


def _last_lr(trainer: Trainer) -> float:
    """The learning rate of the last update applied."""
    optimizer = trainer.optimizer
    return float(optimizer.learning_rate_at(optimizer.iterations.read_value() - 1))


def _format(logs: dict[str, float]) -> str:
    parts = []
    for key, value in logs.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class Tuner:
    """A few optimizer steps at a time on one trainer, traced once for all of them: the short
    tuning of each candidate of a search (policy search roll-outs), with no checkpoint or
    evaluation of its own.

    Args:
        trainer: the trainer (its task and optimizer are reused by every `run`).
        train_data_fn: as `fit`'s.
    """

    def __init__(self, trainer: Trainer, train_data_fn: TrainDataFn) -> None:
        self.trainer, self.train_data_fn = trainer, train_data_fn

    def reset(self) -> None:
        """Zero the optimizer's slots and step counter: the next `run` starts as a fresh optimizer."""
        optimizer = self.trainer.optimizer
        if optimizer.built:
            optimizer.reset()
            optimizer.iterations.assign(0)

    def run(self, steps: int, epoch: int) -> float:
        """`steps` optimizer steps on epoch `epoch`'s data (the next epochs' if it is shorter);
        returns the mean loss. A non-finite loss raises TrainingError."""
        losses, current = [], epoch
        while len(losses) < steps:
            before = len(losses)
            for batch in _distributed_epoch(self.trainer, self.train_data_fn, current, 0):
                loss = float(self.trainer.train_step(batch)["loss"])
                if not math.isfinite(loss):
                    raise TrainingError(f"non-finite loss {loss} in a tuning step (epoch {current})")
                losses.append(loss)
                if len(losses) == steps:
                    break
            if len(losses) == before:
                raise DataError(f"the tuning data of epoch {current} is empty")
            current += 1
        return float(np.mean(losses)) if losses else float("nan")
