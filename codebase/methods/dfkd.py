"""`--method dfkd`: data-free knowledge distillation (Lopes, Fenu & Starner 2017; DeepInversion).

The step's input net is the teacher (`--trained_param`, or the baseline the run trains); the
student is `--student_arch` (honoured: the original's `--student_model` was ignored), trained
from scratch on reconstructed images only. Stages, each resumable:

1. `stats`: the teacher's metadata, the file meant to ship with a model
   (`<step>/teacher_stats.npz`, `codebase.dfkd_stats`): per class, the mean, standard
   deviation and full covariance of every conv and dense layer's pre-activations and of the
   logits at `--dfkd_temperature` (8), from the training images; the spectral statistics too for
   a spectral objective. This is the only stage that reads training data, and it is skipped
   with `--dfkd_stats` (shipped metadata), `--dfkd_data` or `bn_stats`.
2. `reconstruct`: `--dfkd_batches_per_class` batches of `--dfkd_batch_size` images per class,
   `--dfkd_shard_batches` of them per class at a time in one compiled step
   (`codebase.dfkd_tasks.Reconstruct`, `codebase.dfkd_data`): images initialised from
   N(`--dfkd_init_mean`, `--dfkd_init_std`) in [0, 1] pixel units, targets sampled from the
   class statistics with their Cholesky factor, `--dfkd_steps` Adam steps at `--dfkd_lr` on
   `--dfkd_objective`. Shards are written to `<step>/data/`; a resumed run restarts at the first
   unfinished shard, from its last checkpoint. `--dfkd_data` distils from an earlier
   reconstruction instead.
3. `distill`: the student on the reconstructed images alone, against the teacher's
   `softmax(logits / T)` computed online (the soft cross-entropy, no label term), with the
   step's optimisation (the original's: Adam 1e-5, batch 64, 30 epochs); accuracy is measured on
   the real test labels, never as agreement with the teacher.
4. `test`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

import nets
from codebase import dfkd_data, dfkd_stats, stages
from codebase.dfkd_tasks import OBJECTIVES, SPECTRAL, Priors, Reconstruct
from codebase.methods.base import Method, Stage, register
from codebase.options import Options, fraction, option, positive
from codebase.tasks import Distill
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger
from utils.seed import fold_seed

log = get_logger(__name__)

STATS = "teacher_stats.npz"
DATA = "data"
REPORT = "reconstruct.json"
STUDENT_SEED = 16  # folded into the run's seed for the student's initialisation


@dataclasses.dataclass(frozen=True)
class DFKDOptions(Options):
    """Data-free distillation's options (the paper's defaults; `bn_stats`' are DeepInversion's)."""

    student_arch: Optional[str] = option(None, "dfkd: the student trained from scratch (required)")
    dfkd_objective: str = option("all_layers", "dfkd: reconstruction objective", choices=OBJECTIVES)
    dfkd_temperature: float = option(8.0, "dfkd: temperature of the logits' statistics and of the distillation")
    dfkd_stats: Optional[str] = option(None, "dfkd: shipped metadata (.npz of a dfkd stats stage): no training "
                                             "data is read")
    dfkd_data: Optional[str] = option(None, "dfkd: distil from this reconstruction folder (shard_*.npz) instead of "
                                            "reconstructing")
    dfkd_steps: int = option(1000, "dfkd: Adam steps per reconstructed batch")
    dfkd_lr: float = option(0.07, "dfkd: Adam learning rate of the reconstruction")
    dfkd_batch_size: int = option(64, "dfkd: images per reconstructed batch (the gradient's scale; bn_stats' "
                                      "statistics batch)")
    dfkd_batches_per_class: int = option(100, "dfkd: reconstructed batches per class")
    dfkd_shard_batches: int = option(10, "dfkd: batches per class optimised at once (one shard, one file)")
    dfkd_init_mean: float = option(0.15, "dfkd: mean of the initial images, in [0, 1] pixel units")
    dfkd_init_std: float = option(0.1, "dfkd: standard deviation of the initial images, in pixel units")
    dfkd_spectral_fraction: float = option(0.1, "dfkd: fraction of each graph's eigenvectors kept (spectral)")
    dfkd_bn_weight: float = option(10.0, "dfkd bn_stats: weight of the BN statistics term")
    dfkd_ce_weight: float = option(1.0, "dfkd bn_stats: weight of the teacher's cross-entropy to the class")
    dfkd_tv_weight: float = option(2.5e-5, "dfkd bn_stats: weight of the total variation prior")
    dfkd_l2_weight: float = option(0.0, "dfkd bn_stats: weight of the L2 prior")
    dfkd_jitter: int = option(0, "dfkd: random shift of the images by up to this many pixels each step "
                                 "(DeepInversion: 2)")

    def validate(self, **context) -> None:
        super().validate(**context)
        if self.student_arch is None:
            raise ConfigError("--method dfkd needs --student_arch (the net distilled from the teacher)")
        nets.registry.lookup(self.student_arch)
        positive(dfkd_temperature=self.dfkd_temperature, dfkd_steps=self.dfkd_steps, dfkd_lr=self.dfkd_lr,
                 dfkd_batch_size=self.dfkd_batch_size, dfkd_batches_per_class=self.dfkd_batches_per_class,
                 dfkd_shard_batches=self.dfkd_shard_batches, dfkd_init_std=self.dfkd_init_std)
        fraction("dfkd_spectral_fraction", self.dfkd_spectral_fraction, high_open=False)
        for name in ("dfkd_bn_weight", "dfkd_ce_weight", "dfkd_tv_weight", "dfkd_l2_weight", "dfkd_jitter"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dfkd_stats", "dfkd_data"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"--{name} {path} does not exist")


@register("dfkd")
class DataFreeKD(Method):
    Options = DFKDOptions
    needs_trained = True  # the teacher

    @classmethod
    def optim_defaults(cls, dataset: str) -> dict:
        del dataset
        return dict(optimizer="adam", learning_rate=1e-5, schedule="constant", warmup_epochs=0.0, weight_decay=0.0,
                    batch_size=64, train_epoch=30)

    @classmethod
    def check_chain(cls, cfg, index):
        step = cfg.steps[index]
        if index + 1 < len(cfg.steps) and nets.registry.lookup(step.options.student_arch)[0] != \
                nets.registry.lookup(cfg.run.arch)[0]:
            raise ConfigError("--method dfkd must be the last step when --student_arch differs from --arch")

    def stages(self):
        return [Stage("stats", self.stats), Stage("reconstruct", self.reconstruct), Stage("distill", self.distill),
                Stage("test", lambda: stages.test(self.step, arch=self.options.student_arch))]

    # === Helpers ===
    def teacher(self):
        return self.step.start_net()

    def student(self):
        """A fresh `--student_arch`, checked to take the teacher's input. Its initialisation comes
        from the run's seed alone, whatever the stages before it did in this process (a run resumed
        after its reconstruction starts the same student as an uninterrupted one)."""
        shape = self.ctx.info.image_shape
        tf.random.set_seed(fold_seed(self.step.run.seed, STUDENT_SEED))
        net = self.ctx.build_net(arch=self.options.student_arch)
        try:
            net(tf.zeros([1, *shape]), training=False)
        except (ValueError, tf.errors.InvalidArgumentError) as e:
            raise ConfigError(f"--student_arch {self.options.student_arch} cannot take the teacher's "
                              f"{'x'.join(map(str, shape))} input: {str(e).splitlines()[0]}") from None
        return net

    def stats_path(self) -> str:
        return self.options.dfkd_stats or self.step.path(STATS)

    def data_dir(self) -> str:
        return self.options.dfkd_data or self.step.path(DATA)

    def spectral_mode(self) -> Optional[str]:
        return SPECTRAL.get(self.options.dfkd_objective)

    # === Stages ===
    def stats(self):
        opts, step, ctx = self.options, self.step, self.ctx
        self.student()  # a student that cannot take the input fails before any work
        if opts.dfkd_data is not None or opts.dfkd_objective == "bn_stats":
            log.info("dfkd: no statistics needed (%s)", "--dfkd_data" if opts.dfkd_data else "bn_stats")
            return
        teacher = self.teacher()
        if self.spectral_mode() and any(site.kind == "block" for site in teacher.sites()):
            raise ConfigError(f"--dfkd_objective {opts.dfkd_objective}: {teacher.arch} has residual blocks, and the "
                              "spectral graph chains the recorded layers (exact for MLPs, LeNets and VGG only)")
        if opts.dfkd_stats is not None:
            dfkd_stats.load_stats(opts.dfkd_stats, teacher, need_spectral=self.spectral_mode() is not None)
            log.info("dfkd: shipped statistics %s", opts.dfkd_stats)
            return
        sites, classes = dfkd_stats.record_sites(teacher), ctx.info.num_classes
        start = time.time()
        spectral = self.spectral_mode()
        layers, spectral = dfkd_stats.collect_statistics(
            teacher, ctx.data.train_eval(self.run_batch()), sites, opts.dfkd_temperature, classes,
            fraction=opts.dfkd_spectral_fraction if spectral else None, mode=spectral)
        dfkd_stats.save_stats(step.path(STATS), teacher, opts.dfkd_temperature, layers, spectral)
        log.info("dfkd: statistics of %d sites%s in %.1f s -> %s", len(sites),
                 f" and {len(spectral)} spectral graphs" if spectral else "", time.time() - start, step.path(STATS))

    def run_batch(self) -> int:
        return self.step.run.val_batch_size

    def reconstruct(self):
        opts, step, ctx = self.options, self.step, self.ctx
        if opts.dfkd_data is not None:
            return
        teacher = self.teacher()
        plan = dfkd_data.ShardPlan(ctx.info.num_classes, opts.dfkd_batch_size, opts.dfkd_batches_per_class,
                                   opts.dfkd_shard_batches)
        todo = [k for k in range(plan.count) if not os.path.exists(dfkd_data.shard_path(self.data_dir(), k))]
        inputs = self._inputs(teacher) if todo else None  # the statistics are read only when there is work
        report_path = step.path(REPORT)
        report = json.load(open(report_path)) if os.path.exists(report_path) else {"shards": []}
        for shard in todo:
            path = dfkd_data.shard_path(self.data_dir(), shard)
            n, labels = plan.size(shard), plan.labels(shard)
            self._check_split(n)
            with ctx.strategy.scope():
                task = Reconstruct(teacher, self._initial(n, shard), opts.dfkd_objective, opts.dfkd_batch_size,
                                   **inputs(labels, shard))
            optim = step.optim_with(optimizer="adam", learning_rate=opts.dfkd_lr, schedule="constant",
                                    warmup_epochs=0.0, weight_decay=0.0, batch_size=n, train_epoch=1,
                                    steps_per_epoch=opts.dfkd_steps)
            start = time.time()
            logs = step.train(task, os.path.join("reconstruct", f"shard_{shard:03d}"), optim_cfg=optim,
                              data_fn=dfkd_data.index_data_fn(plan, shard, opts.dfkd_jitter, step.run.seed),
                              evaluate=False)
            seconds = time.time() - start
            dfkd_data.save_shard(path, task.images.numpy(), labels)
            report["shards"].append({"shard": shard, "images": n, "seconds": seconds, "mean_objective": logs.get("objective"),
                                     "teacher_top1": logs.get("top1")})
            done = report["shards"]
            seconds_all = max(sum(s["seconds"] for s in done), 1e-9)
            report["images_per_second"] = sum(s["images"] for s in done) / seconds_all  # each after --dfkd_steps
            report["image_steps_per_second"] = report["images_per_second"] * opts.dfkd_steps
            report["steps"] = opts.dfkd_steps
            atomic_write_json(report_path, report)
            log.info("dfkd: shard %d/%d: %d images in %.1f s (objective %.4g, teacher top-1 on them %.3f) -> %s",
                     shard + 1, plan.count, n, seconds, logs.get("objective", float("nan")),
                     logs.get("top1", float("nan")), path)

    def _check_split(self, n: int) -> None:
        run, opts = self.step.run, self.options
        micro = n // (run.num_replicas * run.accum)
        if n % (run.num_replicas * run.accum) or (opts.dfkd_objective == "bn_stats" and micro % opts.dfkd_batch_size):
            raise ConfigError(f"dfkd: a shard of {n} images does not split into --num_replicas {run.num_replicas} x "
                              f"--accum {run.accum} micro-batches of whole --dfkd_batch_size {opts.dfkd_batch_size} "
                              "batches")

    def _initial(self, n: int, shard: int) -> np.ndarray:
        opts, info = self.options, self.ctx.info
        return dfkd_data.initial_images(n, info.image_shape, opts.dfkd_init_mean, opts.dfkd_init_std, info.mean,
                                        info.std, self.step.run.seed, shard)

    def _inputs(self, teacher):
        """`inputs(labels, shard) -> Reconstruct keyword arguments` for the objective."""
        opts, seed = self.options, self.step.run.seed
        objective = opts.dfkd_objective
        priors = Priors(opts.dfkd_bn_weight, opts.dfkd_ce_weight, opts.dfkd_tv_weight, opts.dfkd_l2_weight,
                        opts.dfkd_jitter)
        if objective == "bn_stats":
            return lambda labels, shard: {"priors": priors}
        temperature, layers, spectral = dfkd_stats.load_stats(self.stats_path(), teacher,
                                                              need_spectral=self.spectral_mode() is not None)
        sites = dfkd_stats.record_sites(teacher)
        rates = teacher.dropout_sites() if objective == "all_layers_dropout" else {}
        if objective == "all_layers_dropout" and not rates:
            raise ConfigError(f"--dfkd_objective all_layers_dropout: {teacher.arch} drops nothing in training "
                              "(a teacher trained with dropout, such as hinton-1200, is needed)")
        sizes = {k: int(np.prod(v)) for k, v in dfkd_stats.site_shapes(teacher, list(rates)).items()} if rates else {}
        if self.spectral_mode():
            graphs = {k: v for k, v in spectral.items() if (k == "all") == (self.spectral_mode() == "all_layers")}
            if not graphs:
                raise ConfigError(f"{self.stats_path()}: holds no {self.spectral_mode()} spectral statistics; "
                                  f"recompute them for --dfkd_objective {objective}")
            sampler = dfkd_data.TargetSampler(graphs, "spectral")
        else:
            sampler = dfkd_data.TargetSampler(layers if objective != "top_layer" else {sites[-1]: layers[sites[-1]]},
                                              "layer")

        def inputs(labels, shard):
            targets = sampler.sample(labels, seed, shard)
            out = {"temperature": temperature, "sites": sites, "priors": priors}
            if self.spectral_mode():
                out["spectral"] = {g: (graphs[g]["sites"], graphs[g]["basis"], targets[g]) for g in graphs}
            else:
                out["layer_targets"] = targets
            if rates:
                out["dropout"] = dfkd_data.dropout_masks(rates, sizes, len(labels), seed, shard)
            return out

        return inputs

    def distill(self):
        opts, step, ctx = self.options, self.step, self.ctx
        images, labels = dfkd_data.load_reconstruction(self.data_dir(), ctx.info.image_shape, ctx.info.num_classes)
        teacher, student = self.teacher(), self.student()
        batch = step.optim.batch_size
        if len(images) < batch:
            raise ConfigError(f"{self.data_dir()}: {len(images)} reconstructed images, fewer than --batch_size {batch}")
        optim = step.optim_with(steps_per_epoch=step.optim.steps_per_epoch or len(images) // batch)
        log.info("dfkd: distilling %s into %s on %d reconstructed images (%s)", teacher.arch, student.arch,
                 len(images), self.data_dir())
        task = Distill(student, teacher, 1.0, opts.dfkd_temperature, "pocketflow", ce_weight=0.0)
        step.train(task, "distill", optim_cfg=optim,
                   data_fn=dfkd_data.train_data_fn(images, labels, batch, step.run.seed))
        step.save(student)
