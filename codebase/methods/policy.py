"""`--method rl_cp`, `rl_ws`, `rl_uq`, `rl_nuq`: a DDPG policy search for per-layer settings, then
the learner with the policy found (PocketFlow's `auto` / `optimal` protocols and RL bit allocation).

Each is its learner (`cp`, `ws`, `uq`, `nuq`) with a `search` stage in front:

1. `search`: a stratified held-out split of the *training* set (`--rl_val_images`; the reward
   never sees the test set), the search net (the trained net with the environment's variables:
   channel masks, magnitude masks, or one quantizer per bit width and layer), and
   `codebase.policy_search.PolicySearch` over `--rl_rollouts` roll-outs. It writes
   `search/search.json` (the uniform policy's score, every roll-out's reward and setting, the best:
   the uniform policy unless a roll-out scores above it,
   the trace counts, roll-outs per hour) and `policy.json`, the best policy in the learner's list
   format.
2. the learner's own stages, with its list protocol reading `policy.json`:
   * `rl_cp`: preserve ratios of the groups channel pruning prunes, under `--search_target_rate`,
     then fine-tuning. The inner pruner `--rl_pruner`: `l1` keeps the largest-L1 filters, in the
     roll-outs and in the final net; `cp` keeps in each roll-out the channels LASSO chooses on the
     trained net's statistics (sampled once, each (group, count) solved once), without the
     least-squares refit, and prunes the final net with the full procedure (LASSO and least squares
     layer by layer on the net pruned so far) at the ratios found;
   * `rl_ws`: per-layer sparsities under `--ws_sparsity`, the first layer and the classifier dense;
   * `rl_uq` / `rl_nuq`: per-layer weight bits in [`--rl_min_bits`, `--rl_max_bits`] under
     `--uq_weight_bits` / `--nuq_weight_bits` equivalent bits, then quantization-aware training.

Each roll-out's score is the held-out top-1 after an optional `--rl_tune_steps` of Adam on the
rest of the training set and a BN re-estimation on `--rl_bn_images` training images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from codebase import channel_stats, shunt_tasks, stages
from codebase.ddpg import NOISES, DDPGConfig
from codebase.importance import filter_l1, keep_top
from codebase.methods.base import Stage, register
from codebase.methods.channel import ChannelPruning, CPOptions
from codebase.methods.quantization import (NUQOptions, UQOptions, NonUniformQuantization, UniformQuantization,
                                           attach_quantizers, quantized_layers)
from codebase.methods.sparsity import WeightSparsification, WSOptions, attach_masks, maskable
from codebase.options import Options, option, positive
from codebase.policy_envs import BitsEnv, ChannelEnv, SparsityEnv
from codebase.policy_search import REWARDS, PolicySearch, RolloutScorer
from nets.quantizers import NonUniformQuantizer, QuantizerChoice, UniformQuantizer
from op_utils.task import Classify
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger
from utils.seed import fold_seed

log = get_logger(__name__)

POLICY = "policy.json"
SEARCH = "search"
SPLIT_SEED = 20  # folded into the run's seed for the held-out split


@dataclasses.dataclass(frozen=True)
class RLOptions(Options):
    """The policy search's options (PocketFlow's DDPG defaults)."""

    rl_rollouts: int = option(200, "roll-outs of the search")
    rl_warmup: int = option(50, "first roll-outs with uniformly random actions (they fill the replay buffer)")
    rl_val_images: int = option(1000, "held-out training images of the reward (stratified; never the test set)")
    rl_bn_images: int = option(256, "training images of each roll-out's BatchNorm re-estimation (0: none)")
    rl_tune_steps: int = option(0, "Adam steps of each roll-out's policy on the rest of the training set, from "
                                   "the trained weights, before it is scored (0: none)")
    rl_tune_lr: float = option(3e-4, "learning rate of the roll-outs' tuning")
    rl_noise: str = option("param", "exploration: param (noise on the actor's weights) or tnormal (action noise)",
                           choices=NOISES)
    rl_sigma_start: float = option(1.0, "exploration noise at the first roll-out")
    rl_sigma_end: float = option(1e-5, "exploration noise at the last roll-out (geometric decay)")
    rl_batch_size: int = option(64, "transitions per agent update")
    rl_buffer_size: int = option(0, "replay buffer capacity (0: decisions x --rl_warmup)")
    rl_gamma: float = option(0.9, "discount of the critic's target")
    rl_tau: float = option(0.01, "soft update rate of the target networks")
    rl_lr: float = option(1e-3, "Adam learning rate of the actor and the critic")
    rl_hidden: int = option(64, "units of the actor's and the critic's two hidden layers")
    rl_reward: str = option("top1", "reward of a roll-out: held-out top1 (PocketFlow) or loss (minus the held-out "
                                    "cross-entropy; informative when the top-1 saturates, as for a net trained on "
                                    "all of the training set)", choices=REWARDS)
    rl_uniform: bool = option(False, "no search: score and take the uniform policy (every layer at the target), "
                                     "the comparison baseline in the same pipeline")

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(rl_rollouts=self.rl_rollouts, rl_val_images=self.rl_val_images, rl_tune_lr=self.rl_tune_lr,
                 rl_sigma_start=self.rl_sigma_start, rl_sigma_end=self.rl_sigma_end, rl_batch_size=self.rl_batch_size,
                 rl_lr=self.rl_lr, rl_hidden=self.rl_hidden)
        for name in ("rl_warmup", "rl_bn_images", "rl_tune_steps", "rl_buffer_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.rl_warmup >= self.rl_rollouts:
            raise ConfigError(f"--rl_warmup {self.rl_warmup} leaves no roll-out of the agent in --rl_rollouts "
                              f"{self.rl_rollouts}")
        if self.rl_buffer_size and self.rl_buffer_size < self.rl_batch_size:
            raise ConfigError(f"--rl_buffer_size {self.rl_buffer_size} is below --rl_batch_size {self.rl_batch_size}")
        if not 0.0 <= self.rl_gamma <= 1.0 or not 0.0 < self.rl_tau <= 1.0:
            raise ConfigError(f"--rl_gamma must be in [0, 1] and --rl_tau in (0, 1]; got {self.rl_gamma}, "
                              f"{self.rl_tau}")

    def ddpg(self, decisions: int) -> DDPGConfig:
        return DDPGConfig(hidden=self.rl_hidden, actor_lr=self.rl_lr, critic_lr=self.rl_lr, gamma=self.rl_gamma,
                          tau=self.rl_tau, batch_size=self.rl_batch_size,
                          buffer_size=self.rl_buffer_size or max(self.rl_batch_size, decisions * self.rl_warmup),
                          noise=self.rl_noise, sigma_start=self.rl_sigma_start, sigma_end=self.rl_sigma_end,
                          rollouts=self.rl_rollouts, warmup=self.rl_warmup)


@dataclasses.dataclass(frozen=True)
class BitRange(Options):
    rl_min_bits: int = option(2, "fewest weight bits of a layer")
    rl_max_bits: int = option(8, "most weight bits of a layer")

    def validate(self, **context) -> None:
        super().validate(**context)
        if not 1 <= self.rl_min_bits <= self.rl_max_bits <= 8:
            raise ConfigError(f"--rl_min_bits {self.rl_min_bits} and --rl_max_bits {self.rl_max_bits} must satisfy "
                              "1 <= min <= max <= 8")

    def check_budget(self, flag: str, bits: int, uniform: bool) -> None:
        """The equivalent bits `--flag` must lie in the range, and above its minimum unless no search runs."""
        if not self.rl_min_bits <= bits <= self.rl_max_bits:
            raise ConfigError(f"--{flag} {bits} (the equivalent bits) must lie in [--rl_min_bits, --rl_max_bits] = "
                              f"[{self.rl_min_bits}, {self.rl_max_bits}]")
        if bits == self.rl_min_bits and not uniform:
            raise ConfigError(f"--{flag} {bits} equals --rl_min_bits: only the uniform policy fits the budget; lower "
                              "--rl_min_bits (e.g. 1) to search")


@dataclasses.dataclass(frozen=True)
class RLCPOptions(CPOptions, RLOptions):
    rl_min_ratio: float = option(0.2, "smallest preserve ratio of a group")
    rl_pruner: str = option("l1", "the inner pruner: l1 (the largest-L1 filters, in the roll-outs and the final net) or "
                                  "cp (LASSO's channels in the roll-outs; LASSO + least squares for the final net)",
                            choices=("l1", "cp"))

    def validate(self, **context) -> None:
        super().validate(**context)
        if not 0.0 < self.rl_min_ratio <= 1.0:
            raise ConfigError(f"--rl_min_ratio must be in (0, 1], got {self.rl_min_ratio}")
        if self.cp_protocol != "target":
            raise ConfigError("--method rl_cp chooses every group's ratio itself: drop --cp_protocol")


@dataclasses.dataclass(frozen=True)
class RLWSOptions(WSOptions, RLOptions):
    def validate(self, **context) -> None:
        super().validate(**context)
        if self.ws_protocol != "uniform":
            raise ConfigError("--method rl_ws chooses every layer's sparsity itself: drop --ws_protocol")


@dataclasses.dataclass(frozen=True)
class RLUQOptions(UQOptions, RLOptions, BitRange):
    def validate(self, **context) -> None:
        super().validate(**context)
        if self.uq_bits_file is not None:
            raise ConfigError("--method rl_uq chooses every layer's bits itself: drop --uq_bits_file")
        self.check_budget("uq_weight_bits", self.uq_weight_bits, self.rl_uniform)


@dataclasses.dataclass(frozen=True)
class RLNUQOptions(NUQOptions, RLOptions, BitRange):
    def validate(self, **context) -> None:
        super().validate(**context)
        if self.nuq_bits_file is not None:
            raise ConfigError("--method rl_nuq chooses every layer's bits itself: drop --nuq_bits_file")
        self.check_budget("nuq_weight_bits", self.nuq_weight_bits, self.rl_uniform)


class _Searching:
    """The search stage and the learner's stages reading its policy (mixed into each learner)."""

    policy_options: dict = {}  # the learner's option changes that make it read policy.json

    def stages(self):
        learner = super().stages()
        return [Stage("search", self.search), *[Stage(s.name, self._with_policy(s.run)) for s in learner]]

    def _with_policy(self, run):
        def wrapped():
            changes = {k: (self.step.path(POLICY) if v == POLICY else v) for k, v in self.policy_options.items()}
            self.options = dataclasses.replace(self.step.options, **changes)
            run()

        return wrapped

    def environment(self, net):
        """`(env, frozen variable ids)` on the search net `net` (built in the strategy scope)."""
        raise NotImplementedError

    def search_net(self):
        return self.step.start_net()

    # === The search stage ===
    def search(self):
        step, ctx, opts = self.step, self.ctx, self.options
        if not ctx.data.in_memory:
            raise ConfigError(f"--method {self.name} needs an in-memory dataset (CIFAR, MNIST) for its held-out "
                              f"split; {ctx.info.name} is streamed")
        labels = ctx.data.train_labels()
        if opts.rl_val_images >= len(labels):
            raise ConfigError(f"--rl_val_images {opts.rl_val_images} leaves no training image of the "
                              f"{len(labels)} to tune or re-estimate on")
        train, val = shunt_tasks.stratified_split(labels, opts.rl_val_images / len(labels),
                                                  fold_seed(step.run.seed, SPLIT_SEED))
        net = self.search_net()
        with ctx.strategy.scope():
            env, frozen = self.environment(net)
        images, labels_val = stages.inference_arrays(ctx, val)
        val_data = tf.data.Dataset.from_tensor_slices((images, labels_val)).batch(step.run.val_batch_size)
        calib = None
        if opts.rl_bn_images:
            picked = np.random.default_rng(fold_seed(step.run.seed, SPLIT_SEED, 1)).permutation(train)
            calib_images, calib_labels = stages.inference_arrays(ctx, np.sort(picked[:opts.rl_bn_images]))
            calib = tf.data.Dataset.from_tensor_slices((calib_images, calib_labels)).batch(len(calib_images))
        tuner = None
        if opts.rl_tune_steps:
            optim = step.optim_with(optimizer="adam", learning_rate=opts.rl_tune_lr, schedule="constant",
                                    warmup_epochs=0.0, train_epoch=1)
            variables = [v for v in net.trainable_variables if id(v) not in frozen]
            tuner = ctx.tuner(Classify(net, variables=variables), optim, ctx.train_data_fn(optim, subset=train))
        scorer = RolloutScorer(ctx.strategy, net, val_data, calib, ctx.xla, tuner, opts.rl_tune_steps,
                               net.get_params() if tuner is not None else None)
        if opts.rl_uniform:
            return self._uniform(env, scorer, len(val))
        began = time.perf_counter()
        result = PolicySearch(env, scorer, opts.ddpg(len(env.keys)), step.run.seed, step.path(SEARCH),
                              opts.rl_reward).run(resume=step.run.resume)
        seconds = time.perf_counter() - began
        best = result["best"]
        if best["rollout"] < 0:
            log.info("%s: no roll-out scored above the uniform policy; the policy is the uniform one", self.name)
        atomic_write_json(step.path(POLICY), env.payload(best["policy"]))
        rollouts = result["rollouts"]
        report = {"environment": env.kind, "decisions": len(env.keys), "held_out_images": int(len(val)),
                  "uniform": result["uniform"], "best": best, "trace_counts": scorer.trace_counts(),
                  "search_seconds_this_process": seconds,
                  "mean_rollout_seconds": float(np.mean([r["seconds"] for r in rollouts])),
                  "rollouts_per_hour": 3600.0 / max(float(np.mean([r["seconds"] for r in rollouts])), 1e-9),
                  "rollouts": [{k: v for k, v in r.items() if k != "policy"} for r in rollouts]}
        atomic_write_json(step.path(f"{SEARCH}/search.json"), report)
        log.info("%s: best roll-out %d of %d: held-out top-1 %.4f, loss %.4f (uniform policy %.4f, %.4f); %.1f s per "
                 "roll-out; policy in %s", self.name, best["rollout"] + 1, len(rollouts), best["top1"], best["loss"],
                 result["uniform"]["top1"], result["uniform"]["loss"], report["mean_rollout_seconds"],
                 step.path(POLICY))

    def _uniform(self, env, scorer, held_out: int) -> None:
        policy = env.uniform()
        env.apply(policy)
        uniform = {"policy": policy, **env.summary(policy), **scorer(0)}
        atomic_write_json(self.step.path(POLICY), env.payload(policy))
        os.makedirs(self.step.path(SEARCH), exist_ok=True)
        atomic_write_json(self.step.path(f"{SEARCH}/search.json"), {
            "environment": env.kind, "decisions": len(env.keys), "held_out_images": held_out, "uniform": uniform,
            "best": None, "rollouts": []})
        log.info("%s: --rl_uniform: the uniform policy (held-out top-1 %.4f) in %s", self.name, uniform["top1"],
                 self.step.path(POLICY))


@register("rl_cp")
class PolicyChannelPruning(_Searching, ChannelPruning):
    """Channel pruning at per-group preserve ratios found by the policy search (AMC)."""

    Options = RLCPOptions
    policy_options = {"cp_protocol": "list", "cp_ratio_file": POLICY}

    def search_net(self):
        return self.step.start_net(masked=True)

    def environment(self, net):
        problems = channel_stats.problems(net, streams=self.options.cp_streams)
        select = self._lasso_choice(problems) if self.options.rl_pruner == "cp" else None
        return ChannelEnv(net, [p.group for p in problems], self.options.search_target_rate, self.options.rl_min_ratio,
                          select), set()

    def _lasso_choice(self, problems):
        """`select(group, count)`: LASSO's channels on the trained net's statistics (`--cp_batches` of
        training images), each (group, count) solved once for the whole search."""
        began = time.perf_counter()
        local = self.step.start_net(masked=True, local=True)
        stats = self.sampler(local, None).collect(problems, self._batches())
        log.info("%s: channel statistics of %d groups for LASSO's choice in %.1f s", self.name, len(problems),
                 time.perf_counter() - began)
        chosen = {}

        def select(key, count):
            if (key, count) not in chosen:
                chosen[key, count] = self.kept_channels(stats[key], count, local.groups[key].size)
            return chosen[key, count]

        return select

    def prune(self):
        if self.options.rl_pruner == "cp":
            return super().prune()
        net = self.step.start_net(masked=True, local=True)
        with open(self.step.path(POLICY), encoding="utf-8") as f:
            ratios = json.load(f)
        widths = {k: max(1, int(round(r * net.groups[k].size))) for k, r in ratios.items()}
        for key, kept in keep_top(filter_l1(net), widths).items():
            net.groups[key].keep(kept)
        self.save_pruned(net, {"protocol": "rl", "pruner": "l1",
                               "groups": [{"group": k, "kept": widths[k], "size": net.groups[k].size}
                                          for k in widths]})


@register("rl_ws")
class PolicySparsification(_Searching, WeightSparsification):
    """Weight sparsification at per-layer sparsities found by the policy search."""

    Options = RLWSOptions
    policy_options = {"ws_protocol": "list", "ws_ratio_file": POLICY}

    def environment(self, net):
        masks = attach_masks(net)
        edges = set(maskable(net)) - set(quantized_layers(net, False))
        kernels = {k: net.layers[k].kernel.numpy() for k in masks}
        return SparsityEnv(kernels, masks, self.options.ws_sparsity, fixed=edges), set()


class _PolicyBits(_Searching):
    def bit_settings(self) -> tuple:
        """`(equivalent bits, all_layers, activation bits)`."""
        raise NotImplementedError

    def make_quantizer(self, bits: int):
        raise NotImplementedError

    def environment(self, net):
        o = self.options
        bits, all_layers, activation_bits = self.bit_settings()
        keys = quantized_layers(net, all_layers)
        choices = range(o.rl_min_bits, o.rl_max_bits + 1)
        attached = attach_quantizers(net, lambda key: QuantizerChoice([self.make_quantizer(b) for b in choices]),
                                     keys, activation_bits)["weights"]
        frozen = {id(v) for choice in attached for q in choice.quantizers for v in q.state().values()}
        kernels = {k: net.layers[k].kernel.numpy() for k in keys}
        env = BitsEnv(kernels, dict(zip(keys, attached)), bits, o.rl_min_bits, o.rl_max_bits)
        return env, frozen


@register("rl_uq")
class PolicyUniformQuantization(_PolicyBits, UniformQuantization):
    """Uniform quantization at per-layer bits found by the policy search."""

    Options = RLUQOptions
    policy_options = {"uq_bits_file": POLICY}

    def bit_settings(self):
        o = self.options
        return o.uq_weight_bits, o.uq_all_layers, o.uq_activation_bits

    def make_quantizer(self, bits):
        return UniformQuantizer(bits, self.options.uq_buckets, self.options.uq_bucket_size)


@register("rl_nuq")
class PolicyNonUniformQuantization(_PolicyBits, NonUniformQuantization):
    """Non-uniform quantization at per-layer bits found by the policy search."""

    Options = RLNUQOptions
    policy_options = {"nuq_bits_file": POLICY}

    def bit_settings(self):
        o = self.options
        return o.nuq_weight_bits, o.nuq_all_layers, o.nuq_activation_bits

    def make_quantizer(self, bits):
        o = self.options
        return NonUniformQuantizer(bits, o.nuq_buckets, o.nuq_bucket_size, o.nuq_init)
