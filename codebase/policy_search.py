"""The policy search: a DDPG agent (`codebase.ddpg`) chooses one setting per layer of an environment
(`codebase.policy_envs`), roll-out after roll-out, rewarded by accuracy on held-out *training* images.

A roll-out: the agent acts at every decision (uniformly at random during the warm-up roll-outs),
the environment clips each action to keep its budget reachable, the finished policy is applied
to the search net (variables only), optionally tuned for a bounded number of steps, its BatchNorm
statistics re-estimated on one batch of training images, and it is evaluated on the held-out
split: the reward is that top-1. Every decision of the roll-out is then stored with the reward,
the agent trains once per decision, and the search state is saved atomically (one `.npz`: the
agent's arrays and RNG, the search's RNG, every roll-out's reward and policy, the best), so
`--resume` continues after the last finished roll-out exactly as if uninterrupted.

`RolloutScorer` traces its evaluation, its BN re-estimation and (with tuning) its training step
once for the whole search: policies change variables, not shapes. The roll-out rewards go to
TensorBoard (`<folder>/tensorboard`: `rollout/reward`, `rollout/best`, `rollout/sigma`, the
environment's summary, `agent/critic_loss`) and to a progress bar.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf

from codebase.ddpg import DDPG, DDPGConfig
from nets.layers import BatchNorm
from op_utils.evaluate import Evaluator
from utils.atomic import atomic_open
from utils.errors import ConfigError
from utils.logs import Progress, Scalars, get_logger

log = get_logger(__name__)

STATE = "search_state.npz"
REWARDS = ("top1", "loss")
FORMAT = "policy-search-1"


class _Recalibrating(tf.Module):
    """`net` run in training mode (BN batch statistics, moving statistics replaced by them)."""

    def __init__(self, net):
        super().__init__(name="recalibrating")
        self.net = net

    def __call__(self, x, training=False):
        del training
        return self.net(x, training=True)


class RolloutScorer:
    """Scores the policy applied to `net`: optional tuning, BN re-estimation, held-out top-1.

    Args:
        strategy: the run's strategy (the net was built in its scope).
        net: the search net, its policy variables already set for each call.
        val_data: held-out training images `(images, labels)`, inference preprocessing.
        calib_data: one batch of training images for the BN re-estimation, or None.
        xla: compile the forward passes.
        tuner: a `op_utils.loop.Tuner` of `net`, or None; `tune_steps` steps per roll-out, from
            the trained parameters `snapshot` (restored before every roll-out).
    """

    def __init__(self, strategy, net, val_data, calib_data=None, xla=False, tuner=None, tune_steps=0, snapshot=None):
        self.net, self.val_data, self.calib_data = net, val_data, calib_data
        self.tuner, self.tune_steps, self.snapshot = tuner, int(tune_steps), snapshot
        self.evaluator = Evaluator(strategy, net, xla)
        self.calibrator = Evaluator(strategy, _Recalibrating(net), xla) if calib_data is not None else None
        self.bns = [layer for layer in net.layers.values() if isinstance(layer, BatchNorm)]
        with strategy.scope():
            self.rate = tf.Variable(1.0, trainable=False, name="bn_update_rate")

    def __call__(self, rollout: int) -> dict:
        out = {}
        if self.snapshot is not None:
            self.net.set_params(self.snapshot)
        if self.tuner is not None and self.tune_steps:
            self.tuner.reset()
            out["tune_loss"] = self.tuner.run(self.tune_steps, rollout)
        if self.calibrator is not None:
            for bn in self.bns:
                bn.update_rate = self.rate  # 1.0: the moving statistics become the batch's
            try:
                self.calibrator.evaluate(self.calib_data)
            finally:
                for bn in self.bns:
                    bn.update_rate = None
        result = self.evaluator.evaluate(self.val_data)
        return {**out, "top1": float(result["top1"]), "loss": float(result["loss"])}

    def trace_counts(self) -> dict:
        counts = {"evaluate": self.evaluator.trace_count}
        if self.calibrator is not None:
            counts["recalibrate"] = self.calibrator.trace_count
        return counts


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def save_state(path: str, agent: DDPG, search: dict) -> None:
    """The agent's arrays and meta and the search's meta in one `.npz`, written atomically."""
    state = agent.state_dict()
    meta = json.dumps({"format": FORMAT, "agent": _json_ready(state["meta"]), "search": _json_ready(search)})
    with atomic_open(path, "wb") as f:
        np.savez(f, **{f"agent/{k}": v for k, v in state["arrays"].items()}, meta=np.asarray(meta))


def load_state(path: str, agent: DDPG) -> dict:
    """Restore `agent` from a `save_state` file; returns the search's meta. One-line errors."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k[len("agent/"):]: data[k] for k in data.files if k.startswith("agent/")}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ConfigError(f"policy search state {path} is unreadable ({type(err).__name__}); delete it to start "
                          "the search again") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"policy search state {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        agent.load_state_dict({"arrays": arrays, "meta": meta["agent"]})
    except ConfigError as err:
        raise ConfigError(f"policy search state {path}: {err}") from None
    return meta["search"]


class PolicySearch:
    """The roll-out loop (see the module docstring).

    Args:
        env: a `policy_envs.Env` on the search net.
        scorer: `scorer(rollout) -> {"top1", ...}` of the policy applied to the net.
        config: the agent's `DDPGConfig` (its `rollouts` and `warmup` are the search's).
        seed: seeds the agent and the search's own RNG (the bits environment's visiting order).
        folder: where the state, TensorBoard events and the report go.
        reward: `top1` (PocketFlow) or `loss` (minus the held-out cross-entropy: informative where
            the top-1 saturates, e.g. for a net that was trained on the held-out images too).
    """

    def __init__(self, env, scorer, config: DDPGConfig, seed: int, folder: str, reward: str = "top1"):
        if reward not in REWARDS:
            raise ConfigError(f"policy search reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        self.env, self.scorer, self.config, self.seed, self.folder = env, scorer, config, int(seed), folder
        self.reward = reward
        self.agent = DDPG(env.state_dim, 0.0, 1.0, config, seed)
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7717]))
        os.makedirs(folder, exist_ok=True)
        self.state_path = os.path.join(folder, STATE)

    def score(self, policy: dict, rollout: int) -> dict:
        """The scorer's result for `policy`, with its `reward`."""
        self.env.apply(policy)
        result = self.scorer(rollout)
        return {**result, "reward": result["top1"] if self.reward == "top1" else -result["loss"]}

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Run (or continue) the search; returns `{"best": {...}, "uniform": {...}, "rollouts": [...]}`.
        `stop_after` ends the process's loop after that many roll-outs in all (tests of resuming)."""
        env, agent, cfg = self.env, self.agent, self.config
        if resume and os.path.exists(self.state_path):
            search = load_state(self.state_path, agent)
            self.rng.bit_generator.state = search.pop("rng")
            log.info("policy search: resumed after %d of %d roll-outs", len(search["rollouts"]), cfg.rollouts)
        else:
            uniform = env.uniform()
            search = {"uniform": {"policy": uniform, **env.summary(uniform), **self.score(uniform, 0)},
                      "rollouts": [], "best": None}
            # The uniform policy is the first candidate: the search never returns a policy that
            # scores below it on the held-out split (`best["rollout"]` is -1 while it leads).
            search["best"] = {**search["uniform"], "rollout": -1}
            log.info("policy search: the uniform policy scores top-1 %.4f, loss %.4f on the held-out split (%s)",
                     search["uniform"]["top1"], search["uniform"]["loss"], _describe(env.summary(uniform)))
        scalars = Scalars(os.path.join(self.folder, "tensorboard"))
        done = len(search["rollouts"])
        end = cfg.rollouts if stop_after is None else min(cfg.rollouts, stop_after)
        try:
            with Progress(total=cfg.rollouts, desc="search", log_every=10) as progress:
                progress.update(done)
                for k in range(done, end):
                    search["rollouts"].append(self._rollout(k, scalars))
                    entry = search["rollouts"][-1]
                    if search["best"] is None or entry["reward"] > search["best"]["reward"]:
                        search["best"] = {**entry, "rollout": k}
                    scalars.scalar("rollout/best", search["best"]["reward"], k)
                    save_state(self.state_path, agent, {**search, "rng": self.rng.bit_generator.state})
                    progress.update(1, reward=entry["reward"], best=search["best"]["reward"])
        finally:
            scalars.close()
        return search

    def _rollout(self, k: int, scalars) -> dict:
        env, agent = self.env, self.agent
        began = time.perf_counter()
        agent.begin_rollout(k)
        env.begin(self.rng)
        states, actions = [], []
        for position in range(len(env.keys)):
            state = env.state(position)
            states.append(state)
            actions.append(env.take(position, agent.act(state, explore=True)))
        policy = env.policy()
        result = self.score(policy, k + 1)
        reward = result["reward"]
        for i, (state, action) in enumerate(zip(states, actions)):
            last = i == len(states) - 1
            agent.remember(state, action, reward, states[i] if last else states[i + 1], last)
        losses = [agent.train_step() for _ in states]
        agent.end_rollout(reward)
        losses = [x for x in losses if x]
        summary = env.summary(policy)
        scalars.scalars({"rollout/reward": reward, "rollout/sigma": agent.sigma,
                         **{f"rollout/{k2}": v for k2, v in summary.items()}}, k)
        if losses:
            scalars.scalar("agent/critic_loss", float(np.mean([x["critic_loss"] for x in losses])), k)
        return {**result, "policy": policy, **summary, "seconds": time.perf_counter() - began}


def _describe(summary: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
