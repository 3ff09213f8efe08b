"""`--method ekg`: warm-up, greedy search, memory bank, memory-bank KD fine-tuning, test.

Every stage saves its artefacts in the step's folder before it is marked done; the search saves
its state after every accepted step (`search_state.json`), so `--resume` continues an
interrupted search at its last accepted step. When the next step of the chain trains the net
(`--method ekg,kd`), the memory bank and the fine-tuning are left to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from codebase import stages
from codebase.methods.base import Stage, register
from codebase.methods.ekg.memory_bank import build_memory_bank, teacher_settings
from codebase.methods.ekg.search import GreedySearch, SearchState, uses_renorm
from codebase.methods.pruning import Batched, FlopsTarget, PruneMethod
from codebase.options import option, positive
from dataloader import SideData
from op_utils.losses import kl_t, select_teachers
from op_utils.task import Classify
from utils.atomic import atomic_open, atomic_write_json
from utils.errors import ConfigError
from utils.logs import Scalars, get_logger
from utils.memory import describe_resident, release_freed_memory

log = get_logger(__name__)

WARM, STATE, BANK = "warmup_params.pkl", "search_state.json", "knowledge.npy"
# Streamed training sets (ImageNet): the labels scanned once, and the bank as a raw float16 file
# beside its description, read shard by shard with the images while fine-tuning.
LABELS, BANK_RAW, BANK_META = "train_labels.npy", "knowledge.f16", "knowledge.json"


@dataclasses.dataclass(frozen=True)
class EKGOptions(FlopsTarget, Batched):
    """EKG's options (defaults: the reference's `train_cifar.py`)."""

    search_step: float = option(0.2, "EKG width step of a gate (divided by the number of times its group is used)")
    search_round_to: int = option(1, "keep every searched width a multiple of this (8 or 16: kernels run on full "
                                     "channel blocks, so FLOPs saved become time saved); 1 = EKG's widths")
    search_cache_mb: int = option(256, "memory for the search's cached segment inputs (candidates restart from "
                                       "them; with less, fewer are cached and more is recomputed; same results)",
                                  run_control=True)
    search_train_per_class: int = option(256, "warm-up subset: the first images of each class")
    search_val_per_class: int = option(32, "search-validation subset: the last images of each class")
    search_warmup_lr: float = option(1e-3, "learning rate of the one-epoch warm-up on the warm-up subset")
    num_teacher: int = option(5, "interim sub-networks in the memory bank")
    knowledge: bool = option(True, "fine-tune with memory-bank distillation (--no-knowledge: plain cross-entropy)")
    temperature: float = option(0.0, "memory-bank distillation temperature (0: 4, or 10 with >= 1000 classes)")

    def validate(self, **context) -> None:
        super().validate(**context)
        if not 0 < self.search_step <= 1:
            raise ConfigError(f"--search_step must be in (0, 1], got {self.search_step}")
        positive(search_round_to=self.search_round_to, search_cache_mb=self.search_cache_mb,
                 search_train_per_class=self.search_train_per_class, search_val_per_class=self.search_val_per_class,
                 num_teacher=self.num_teacher, search_warmup_lr=self.search_warmup_lr)
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")


def search_subsets(labels, train_per_class: int, val_per_class: int, seed: int = 1):
    """Indices of EKG's subsets: the first images of each class (warm-up) and the last ones
    (search validation, shuffled with `seed`), both from the training set."""
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(idx[-val_per_class:])
        train.append(idx[:min(train_per_class, max(len(idx) - val_per_class, 0))])
    val = np.concatenate(val)
    return np.concatenate(train), val[np.random.default_rng(seed).permutation(len(val))]


def memory_bank_loss(bank, temperature: float):
    """EKG fine-tuning loss on `(images [b, views, H, W, C], labels, index)` batches.

    With `bank` None, the batches carry each example's teacher logits `[b, classes, T]` in
    place of its index (a streamed bank, see `SideData`).

    Per example: the mean over the views of `CE(y, z_v) + KL_T(K_bar || z_v)`, where `K_bar`
    is the mean of the teachers closer to the top teacher than the student (its logits
    averaged over views), chosen per batch (per micro-batch under accumulation).
    """
    bank = None if bank is None else tf.constant(bank)

    def loss_fn(model, batch, training):
        images, labels, index = batch
        views = images.shape[1]
        logits = model(tf.reshape(images, [-1, *images.shape[2:]]), training=training)
        logits = tf.reshape(logits, [-1, views, logits.shape[-1]])
        teachers = tf.cast(index, tf.float32) if bank is None else tf.gather(bank, index)
        target = select_teachers(teachers, tf.reduce_mean(logits, 1), temperature)
        labels = tf.cast(labels, tf.int32)
        ce = [tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits[:, v]) for v in range(views)]
        kd = [kl_t(target, logits[:, v], temperature) for v in range(views)]
        loss = (tf.add_n(ce) + tf.add_n(kd)) / views
        return loss, tf.reduce_mean(logits, 1), {"ce": tf.add_n(ce) / views, "kd": tf.add_n(kd) / views}

    return loss_fn


@register("ekg")
class EKG(PruneMethod):
    Options = EKGOptions

    def stages(self):
        head = [Stage("warmup", self.warmup), Stage("search", self.search)]
        if self.step.next_trains:
            return [*head, Stage("test", self.test)]
        return [*head, Stage("memory_bank", self.memory_bank), Stage("finetune", self.finetune),
                Stage("test", self.test)]

    def _labels(self):
        """Training labels; a streamed set's are scanned once and kept in the step's folder."""
        data, path = self.ctx.data, self.step.path(LABELS)
        if data.in_memory:
            return data.train_labels()
        if not os.path.exists(path):
            tic = time.perf_counter()
            labels = data.train_labels()
            with atomic_open(path, "wb") as f:
                np.save(f, labels)
            log.info("scanned %d training labels in %.1f s", len(labels), time.perf_counter() - tic)
        return np.load(path, allow_pickle=False)

    def _subsets(self):
        return search_subsets(self._labels(), self.options.search_train_per_class,
                              self.options.search_val_per_class)

    def _subset_arrays(self, indices):
        """Training images at `indices` (in that order) with inference preprocessing, as numpy."""
        data = self.ctx.data
        if data.in_memory:
            return stages.inference_arrays(self.ctx, indices)
        batches = list(data.train_subset(indices, self.options.search_batch_size))
        images = np.concatenate([b[0].numpy() for b in batches])
        labels = np.concatenate([b[1].numpy() for b in batches])
        where = np.searchsorted(np.concatenate([b[2].numpy() for b in batches]), indices)
        return images[where], labels[where].astype(np.int32)

    def warmup(self):
        """One epoch at `--search_warmup_lr` on the warm-up subset with inference preprocessing."""
        ctx, step, batch = self.ctx, self.step, self.step.optim.batch_size
        net = step.start_net()
        subset = self._subsets()[0]
        steps = max(1, len(subset) // batch)
        seed = step.run.seed
        if ctx.data.in_memory:
            images, labels = stages.inference_arrays(ctx, subset)

            def data_fn(epoch, ictx):
                order = np.random.default_rng([seed, epoch]).permutation(len(labels))
                ds = tf.data.Dataset.from_tensor_slices((images[order], labels[order]))
                ds = ds.shard(ictx.num_input_pipelines, ictx.input_pipeline_id)
                return ds.batch(ictx.get_per_replica_batch_size(batch), drop_remainder=True)
        else:
            def data_fn(epoch, ictx):
                ds = ctx.data.train_subset(subset, ictx.get_per_replica_batch_size(batch), epoch, seed,
                                           ictx.num_input_pipelines, ictx.input_pipeline_id)
                return ds.map(lambda x, y, i: (x, y)).unbatch().batch(
                    ictx.get_per_replica_batch_size(batch), drop_remainder=True)

        # Recomputed activations: the allocator keeps its peak pool for the rest of the process
        # (TensorFlow's BFC allocators, oneDNN's on CPU), so the warm-up's training activations
        # would set the search's memory. Same updates, for about a third more of one short epoch.
        optim = step.optim_with(learning_rate=self.options.search_warmup_lr, schedule="constant", train_epoch=1,
                                steps_per_epoch=steps)
        step.train(net, "warmup", optim, data_fn=data_fn, recompute=True)
        step.save(net, WARM)

    def _search(self):
        step, opts = self.step, self.options
        net = self.ctx.load_net(step.path(WARM), masked=True, local=True)
        images, labels = self._subset_arrays(self._subsets()[1])
        scalars = Scalars(step.path("search/tensorboard"))

        def on_step(state, info):
            atomic_write_json(step.path(STATE), state.to_json())
            scalars.scalars({"search/acc": info["acc"], "search/loss": info["ce"],
                             "search/flops_rate": info["flops_rate"], "search/seconds": info["seconds"]}, state.step)
            scalars.flush()
            log.info("search step %d: %s -> FLOPs %.4f, acc %.4f, CE %.4f, %d candidates, %.1f s, %s", state.step,
                     info["key"], info["flops_rate"], info["acc"], info["ce"], info["candidates"], info["seconds"],
                     describe_resident())

        search = GreedySearch(net, images, labels, opts.search_target_rate, opts.search_step, opts.search_batch_size,
                              on_step=on_step, cache_mb=opts.search_cache_mb, round_to=opts.search_round_to)
        return search, scalars

    def search(self):
        step = self.step
        search, scalars = self._search()
        state = None
        if os.path.exists(step.path(STATE)):
            with open(step.path(STATE)) as f:
                state = SearchState.from_json(json.load(f))
            log.info("search: resuming after accepted step %d", state.step)
        tic = time.perf_counter()
        try:
            state = search.run(state)
        finally:
            scalars.close()
        seconds = time.perf_counter() - tic
        atomic_write_json(step.path(STATE), {**state.to_json(), "done": True})
        net, traces = search.net, search.trace_count
        # Slimming needs the masked net only: free the search's cached activations and traced
        # functions first, or the BN re-estimation and evaluation below would add to them.
        del search
        release_freed_memory()
        self.save_pruned(net, {"search_seconds": seconds, "search_steps": state.step, "trace_count": traces})

    def memory_bank(self):
        step, opts = self.step, self.options
        net = self.ctx.load_net(step.path(WARM), masked=True, local=True)
        net.options.set(renorm=uses_renorm(net))  # the search's convention: teachers are its sub-networks
        with open(step.path(STATE)) as f:
            state = SearchState.from_json(json.load(f))
        teachers = teacher_settings(state.history, opts.num_teacher)
        tic = time.perf_counter()
        dataset = self.ctx.data.train_eval(opts.search_batch_size)
        if self.ctx.data.in_memory:
            bank = build_memory_bank(net, teachers, dataset, self.ctx.info.num_train)
            with atomic_open(step.path(BANK), "wb") as f:
                np.save(f, bank)
        else:
            bank = self._stream_bank(net, teachers, dataset)
        log.info("memory bank: %d teachers x %d images in %.1f s", len(teachers), len(bank), time.perf_counter() - tic)

    def _stream_bank(self, net, teachers, dataset):
        """The bank as a raw float16 file on disk (ImageNet's is 12.8 GB), written to a temporary
        file that replaces `knowledge.f16` only when complete."""
        step = self.step
        shape = (int(len(self._labels())), net.groups["logits"].size, len(teachers))
        tmp = step.path(f".{BANK_RAW}.tmp")
        bank = np.memmap(tmp, np.float16, "w+", shape=shape)
        build_memory_bank(net, teachers, dataset, shape[0], out=bank)
        bank.flush()
        os.replace(tmp, step.path(BANK_RAW))
        atomic_write_json(step.path(BANK_META), {"shape": list(shape), "dtype": "float16"})
        return bank

    def finetune_task(self):
        step, opts, ctx = self.step, self.options, self.ctx
        if not opts.knowledge:
            return None, None
        temperature = opts.temperature or (10.0 if ctx.info.num_classes >= 1000 else 4.0)
        batch, seed = step.optim.batch_size, step.run.seed
        if not ctx.data.in_memory:
            with open(step.path(BANK_META)) as f:
                meta = json.load(f)
            side = SideData(step.path(BANK_RAW), tuple(meta["shape"][1:]), meta["dtype"])
            bank, extra = None, dict(side=side)
        else:
            bank, extra = np.load(step.path(BANK)), dict(with_index=True)

        def data_fn(epoch, ictx):
            return ctx.data.train(ictx.get_per_replica_batch_size(batch), epoch, seed, views=2,
                                  num_shards=ictx.num_input_pipelines, shard_index=ictx.input_pipeline_id, **extra)

        loss = memory_bank_loss(bank, temperature)
        return (lambda net: Classify(net, loss)), data_fn
