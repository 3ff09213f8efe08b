"""`--method ekg`: warm-up, greedy search, memory bank, memory-bank KD fine-tuning, test.

Every stage saves its artefacts in `--train_path` before it is marked done; the search saves
its state after every accepted step (`search_state.json`), so `--resume` continues an
interrupted search at its last accepted step.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf

from codebase.context import save_net
from codebase.methods.base import Stage, register
from codebase.methods.ekg.memory_bank import build_memory_bank, pick_teachers
from codebase.methods.ekg.search import GreedySearch, SearchState
from codebase.methods.pruning import PruningMethod, inference_arrays, log
from dataloader import SideData
from op_utils.losses import kl_t, select_teachers
from utils.atomic import atomic_open, atomic_write_json
from utils.logs import Scalars
from utils.memory import describe_resident, release_freed_memory

WARM, STATE, BANK = "warmup_params.pkl", "search_state.json", "knowledge.npy"
# Streamed training sets (ImageNet): the labels scanned once, and the bank as a raw float16 file
# beside its description, read shard by shard with the images while fine-tuning.
LABELS, BANK_RAW, BANK_META = "train_labels.npy", "knowledge.f16", "knowledge.json"


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
class EKG(PruningMethod):
    def stages(self):
        return [Stage("baseline", self.baseline), Stage("warmup", self.warmup), Stage("search", self.search),
                Stage("memory_bank", self.memory_bank), Stage("finetune", self.finetune), Stage("test", self.test)]

    def _labels(self):
        """Training labels; a streamed set's are scanned once and kept in the run folder."""
        data, path = self.ctx.data, self.ctx.path(LABELS)
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
        return search_subsets(self._labels(), self.cfg.search_train_per_class, self.cfg.search_val_per_class)

    def _subset_arrays(self, indices):
        """Training images at `indices` (in that order) with inference preprocessing, as numpy."""
        data = self.ctx.data
        if data.in_memory:
            return inference_arrays(self.ctx, indices)
        batches = list(data.train_subset(indices, self.cfg.search_batch_size))
        images = np.concatenate([b[0].numpy() for b in batches])
        labels = np.concatenate([b[1].numpy() for b in batches])
        where = np.searchsorted(np.concatenate([b[2].numpy() for b in batches]), indices)
        return images[where], labels[where].astype(np.int32)

    def warmup(self):
        """One epoch at lr 1e-3 on the warm-up subset with inference preprocessing."""
        ctx, cfg = self.ctx, self.cfg
        net = self.base_net()
        subset = self._subsets()[0]
        steps = max(1, len(subset) // cfg.batch_size)
        if ctx.data.in_memory:
            images, labels = inference_arrays(ctx, subset)

            def data_fn(epoch, ictx):
                order = np.random.default_rng([cfg.seed, epoch]).permutation(len(labels))
                ds = tf.data.Dataset.from_tensor_slices((images[order], labels[order]))
                ds = ds.shard(ictx.num_input_pipelines, ictx.input_pipeline_id)
                return ds.batch(ictx.get_per_replica_batch_size(cfg.batch_size), drop_remainder=True)
        else:
            def data_fn(epoch, ictx):
                ds = ctx.data.train_subset(subset, ictx.get_per_replica_batch_size(cfg.batch_size), epoch, cfg.seed,
                                           ictx.num_input_pipelines, ictx.input_pipeline_id)
                return ds.map(lambda x, y, i: (x, y)).unbatch().batch(
                    ictx.get_per_replica_batch_size(cfg.batch_size), drop_remainder=True)

        # Recomputed activations: the allocator keeps its peak pool for the rest of the process
        # (TensorFlow's BFC allocators, oneDNN's on CPU), so the warm-up's training activations
        # would set the search's memory. Same updates, for about a third more of one short epoch.
        ctx.train(net, 1, stage="warmup", train_data_fn=data_fn, learning_rate=1e-3, steps_per_epoch=steps,
                  constant_lr=True, recompute=True)
        save_net(net, ctx.path(WARM))

    def _search(self):
        ctx, cfg = self.ctx, self.cfg
        net = ctx.copy_net(ctx.load_net(ctx.path(WARM)), masked=True, local=True)
        images, labels = self._subset_arrays(self._subsets()[1])
        scalars = Scalars(ctx.path("search/tensorboard"))

        def on_step(state, info):
            atomic_write_json(ctx.path(STATE), state.to_json())
            scalars.scalars({"search/acc": info["acc"], "search/loss": info["ce"],
                             "search/flops_rate": info["flops_rate"], "search/seconds": info["seconds"]}, state.step)
            scalars.flush()
            log.info("search step %d: %s -> FLOPs %.4f, acc %.4f, CE %.4f, %d candidates, %.1f s, %s", state.step,
                     info["key"], info["flops_rate"], info["acc"], info["ce"], info["candidates"], info["seconds"],
                     describe_resident())

        search = GreedySearch(net, images, labels, cfg.search_target_rate, cfg.search_step, cfg.search_batch_size,
                              on_step=on_step, cache_mb=cfg.search_cache_mb, round_to=cfg.search_round_to)
        return search, scalars

    def search(self):
        ctx = self.ctx
        search, scalars = self._search()
        state = None
        if os.path.exists(ctx.path(STATE)):
            with open(ctx.path(STATE)) as f:
                state = SearchState.from_json(json.load(f))
            log.info("search: resuming after accepted step %d", state.step)
        tic = time.perf_counter()
        state = search.run(state)
        seconds = time.perf_counter() - tic
        atomic_write_json(ctx.path(STATE), {**state.to_json(), "done": True})
        scalars.close()
        net, traces = search.net, search.trace_count
        # Slimming needs the masked net only: free the search's cached activations and traced
        # functions first, or the BN re-estimation and evaluation below would add to them.
        del search
        release_freed_memory()
        self.save_slimmed(net, {"search_seconds": seconds, "search_steps": state.step, "trace_count": traces})

    def memory_bank(self):
        ctx, cfg = self.ctx, self.cfg
        search, _ = self._search()
        with open(ctx.path(STATE)) as f:
            state = SearchState.from_json(json.load(f))
        interim = state.history[:-1] or state.history
        picked = pick_teachers([ce for _, _, ce in interim], cfg.num_teacher)
        teachers = [(interim[i][0], interim[i][1]) for i in picked]
        tic = time.perf_counter()
        dataset = ctx.data.train_eval(cfg.search_batch_size)
        if ctx.data.in_memory:
            bank = build_memory_bank(search, teachers, dataset, ctx.info.num_train)
            with atomic_open(ctx.path(BANK), "wb") as f:
                np.save(f, bank)
        else:
            bank = self._stream_bank(search, teachers, dataset)
        log.info("memory bank: %d teachers x %d images in %.1f s", len(teachers), len(bank), time.perf_counter() - tic)

    def _stream_bank(self, search, teachers, dataset):
        """The bank as a raw float16 file on disk (ImageNet's is 12.8 GB), written to a temporary
        file that replaces `knowledge.f16` only when complete."""
        ctx = self.ctx
        shape = (int(len(self._labels())), search.net.groups["logits"].size, len(teachers))
        tmp = ctx.path(f".{BANK_RAW}.tmp")
        bank = np.memmap(tmp, np.float16, "w+", shape=shape)
        build_memory_bank(search, teachers, dataset, shape[0], out=bank)
        bank.flush()
        os.replace(tmp, ctx.path(BANK_RAW))
        atomic_write_json(ctx.path(BANK_META), {"shape": list(shape), "dtype": "float16"})
        return bank

    def finetune_loss(self):
        cfg, ctx = self.cfg, self.ctx
        if not cfg.knowledge:
            return None, None
        temperature = cfg.temperature or (10.0 if ctx.info.num_classes >= 1000 else 4.0)
        if not ctx.data.in_memory:
            with open(ctx.path(BANK_META)) as f:
                meta = json.load(f)
            side = SideData(ctx.path(BANK_RAW), tuple(meta["shape"][1:]), meta["dtype"])

            def streamed(epoch, ictx):
                return ctx.data.train(ictx.get_per_replica_batch_size(cfg.batch_size), epoch, cfg.seed, views=2,
                                      side=side, num_shards=ictx.num_input_pipelines,
                                      shard_index=ictx.input_pipeline_id)

            return memory_bank_loss(None, temperature), streamed
        bank = np.load(ctx.path(BANK))

        def data_fn(epoch, ictx):
            return ctx.data.train(ictx.get_per_replica_batch_size(cfg.batch_size), epoch, cfg.seed, views=2,
                                  with_index=True, num_shards=ictx.num_input_pipelines,
                                  shard_index=ictx.input_pipeline_id)

        return memory_bank_loss(bank, temperature), data_fn

