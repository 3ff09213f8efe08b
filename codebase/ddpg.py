"""DDPG: the actor-critic agent of the policy search (PocketFlow's rl_agents/ddpg design).

The search decides one compression ratio per layer, a scalar action in `[low, high]`, from a
small state vector describing the layer. A roll-out is one pass over the layers; its reward is
known only at the end, and every decision of the roll-out is stored with that final reward.
The agent is a plain DDPG (deterministic actor, Q critic, target copies soft-updated with
`tau`) with PocketFlow's choices:

* each hidden layer is dense -> LayerNorm -> ReLU; the actor ends in a sigmoid scaled onto
  `[low, high]`, the critic reads `concat(state, action)`; both output layers start small;
* exploration is parameter-space noise (the actor's kernels and biases plus `N(0, sigma^2)`,
  one draw per roll-out; LayerNorm's gain and bias are left alone) or action noise from a
  normal truncated to `[low, high]` ("tnormal"); `sigma` decays geometrically from
  `sigma_start` (roll-out 0) to `sigma_end` (the last roll-out); the first `warmup`
  roll-outs act uniformly at random instead;
* the critic's target subtracts a baseline, an exponential moving average of the roll-outs'
  rewards, from the sampled rewards: `y = (r - baseline) + (1 - done) * gamma * Q'(s', pi'(s'))`.
  A roll-out's transitions are stored and trained on before its `end_rollout`, so the baseline
  in its train steps is the average over the roll-outs before it (0 until the first one ends);
* training starts once the replay buffer (a fixed-capacity ring) is full.

Everything random (initial weights, parameter noise, action noise, warm-up actions, minibatch
indices) is drawn from the agent's own `np.random.Generator(PCG64(seed))`, and the TensorFlow
side is float32 dense ops in two `tf.function`s of fixed shapes (act: `[1, state_dim]`; train:
`[batch_size, ...]`), each traced once. A run is thus a pure function of its seed and its
environment, and `state_dict` (or `save_agent`, one `.npz`) holds all it needs to resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile

import numpy as np
import tensorflow as tf

from utils.atomic import atomic_open
from utils.errors import ConfigError

NOISES = ("param", "tnormal")
STATE_FORMAT = "ddpg-1"  # meta["format"] of state_dict; bump it when the layout changes

_LN_EPS = 1e-5
_FINAL_INIT = 3e-3  # output layers' weights and biases start uniform in +-this
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_TNORMAL_TRIES = 1000  # rejection sampling of the truncated normal; then the mean itself
_META_KEY = "meta"  # the JSON string's entry in save_agent's .npz (array names all hold a "/")


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@dataclasses.dataclass(frozen=True)
class DDPGConfig:
    """The agent's hyper-parameters (PocketFlow's defaults).

    Args:
        hidden: Units of each hidden layer of the actor and the critic.
        layers: Hidden layers of each network.
        actor_lr: Adam learning rate of the actor.
        critic_lr: Adam learning rate of the critic.
        gamma: Discount of the critic's target, in [0, 1].
        tau: Soft-update rate of the target networks, in (0, 1].
        batch_size: Transitions per train step.
        buffer_size: Capacity of the replay buffer, at least `batch_size`; the search sets it
            (PocketFlow: the warm-up roll-outs' transitions). Required by `DDPG`.
        noise: "param" (parameter-space noise on the actor's weights) or "tnormal" (action
            noise from a normal truncated to the action range, std `sigma` in action units).
        sigma_start: Noise scale at roll-out 0 (> 0).
        sigma_end: Noise scale at the last roll-out, `rollouts - 1` (> 0).
        baseline_decay: Decay of the rewards' moving average, in [0, 1).
        rollouts: Roll-outs of the search; sets the noise decay.
        warmup: Roll-outs of uniformly random actions before the actor acts.

    Raises:
        ConfigError: If a value is out of range.
    """

    hidden: int = 64
    layers: int = 2
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    gamma: float = 0.9
    tau: float = 0.01
    batch_size: int = 64
    buffer_size: int | None = None
    noise: str = "param"
    sigma_start: float = 1.0
    sigma_end: float = 1e-5
    baseline_decay: float = 0.95
    rollouts: int = 200
    warmup: int = 50

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "batch_size", "rollouts"):
            value = getattr(self, name)
            if not _integer(value) or value < 1:
                raise ConfigError(f"DDPG {name} must be a positive integer, got {value!r}")
        if not _integer(self.warmup) or self.warmup < 0:
            raise ConfigError(f"DDPG warmup must be an integer >= 0, got {self.warmup!r}")
        if self.buffer_size is not None and (not _integer(self.buffer_size) or self.buffer_size < self.batch_size):
            raise ConfigError(f"DDPG buffer_size must be an integer >= batch_size={self.batch_size}, "
                              f"got {self.buffer_size!r}")
        for name in ("actor_lr", "critic_lr", "sigma_start", "sigma_end"):
            value = getattr(self, name)
            if not _number(value) or value <= 0:
                raise ConfigError(f"DDPG {name} must be a number > 0, got {value!r}")
        if not (_number(self.gamma) and 0 <= self.gamma <= 1):
            raise ConfigError(f"DDPG gamma must be in [0, 1], got {self.gamma!r}")
        if not (_number(self.tau) and 0 < self.tau <= 1):
            raise ConfigError(f"DDPG tau must be in (0, 1], got {self.tau!r}")
        if not (_number(self.baseline_decay) and 0 <= self.baseline_decay < 1):
            raise ConfigError(f"DDPG baseline_decay must be in [0, 1), got {self.baseline_decay!r}")
        if self.noise not in NOISES:
            raise ConfigError(f"DDPG noise must be one of {', '.join(NOISES)}, got {self.noise!r}")

    def sigma(self, index: int) -> float:
        """The noise scale of roll-out `index`: geometric from `sigma_start` to `sigma_end`.

        Roll-outs past the last one keep `sigma_end`.
        """
        last = max(self.rollouts - 1, 1)
        return float(self.sigma_start * (self.sigma_end / self.sigma_start) ** (min(index, last) / last))


class _MLP:
    """Hidden layers dense -> LayerNorm -> ReLU, then one linear output unit; weights in tf.Variables.

    Args:
        arrays: The weights, in the order of `names(...)`.
        names: Their names (`hidden0/kernel`, ..., `out/bias`).
    """

    def __init__(self, arrays: list, names: list) -> None:
        self.names = list(names)
        self.variables = [tf.Variable(np.asarray(a, np.float32), trainable=True) for a in arrays]

    @staticmethod
    def layout(in_dim: int, hidden: int, layers: int) -> list:
        """`(name, shape)` of every weight of the network."""
        out, width = [], in_dim
        for i in range(layers):
            out += [(f"hidden{i}/kernel", (width, hidden)), (f"hidden{i}/bias", (hidden,)),
                    (f"hidden{i}/ln_gain", (hidden,)), (f"hidden{i}/ln_bias", (hidden,))]
            width = hidden
        return out + [("out/kernel", (width, 1)), ("out/bias", (1,))]

    @staticmethod
    def initial(rng: np.random.Generator, in_dim: int, hidden: int, layers: int) -> tuple:
        """`(names, arrays)` of a fresh network: Glorot-uniform hidden kernels, zero biases, unit
        LayerNorm gains, output weights and bias uniform in +-3e-3; drawn from `rng` only."""
        names, arrays = [], []
        for name, shape in _MLP.layout(in_dim, hidden, layers):
            if name.startswith("out/"):
                value = rng.uniform(-_FINAL_INIT, _FINAL_INIT, size=shape)
            elif name.endswith("/kernel"):
                limit = math.sqrt(6.0 / (shape[0] + shape[1]))
                value = rng.uniform(-limit, limit, size=shape)
            elif name.endswith("/ln_gain"):
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            names.append(name)
            arrays.append(value.astype(np.float32))
        return names, arrays

    def perturbable(self) -> list:
        """Whether each weight gets parameter noise: kernels and biases yes, LayerNorm's no."""
        return [not name.split("/")[-1].startswith("ln_") for name in self.names]

    def numpy(self) -> list:
        return [v.numpy() for v in self.variables]

    def assign(self, arrays: list) -> None:
        for var, value in zip(self.variables, arrays):
            var.assign(np.asarray(value, np.float32))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        h, weights = x, self.variables
        for i in range(0, len(weights) - 2, 4):
            kernel, bias, gain, beta = weights[i:i + 4]
            h = tf.matmul(h, kernel) + bias
            mean = tf.reduce_mean(h, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
            h = tf.nn.relu((h - mean) * tf.math.rsqrt(var + _LN_EPS) * gain + beta)
        return tf.matmul(h, weights[-2]) + weights[-1]


class _Adam:
    """Adam (Kingma & Ba) over a fixed list of variables; its moments and step are tf.Variables.

    Args:
        variables: The variables it updates.
        lr: Learning rate.
    """

    def __init__(self, variables: list, lr: float) -> None:
        self.variables, self.lr = variables, float(lr)
        self.m = [tf.Variable(np.zeros(v.shape, np.float32), trainable=False) for v in variables]
        self.v = [tf.Variable(np.zeros(v.shape, np.float32), trainable=False) for v in variables]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

    def apply(self, grads: list) -> None:
        t = tf.cast(self.step.assign_add(1), tf.float32)
        rate = self.lr * tf.sqrt(1.0 - tf.pow(_ADAM_BETA2, t)) / (1.0 - tf.pow(_ADAM_BETA1, t))
        for var, m, v, g in zip(self.variables, self.m, self.v, grads):
            m_new = m.assign(_ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * g)
            v_new = v.assign(_ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * tf.square(g))
            var.assign_sub(rate * m_new / (tf.sqrt(v_new) + _ADAM_EPS))


class _ReplayBuffer:
    """A fixed-capacity ring of transitions `(state, action, reward, next_state, done)` in numpy arrays.

    Args:
        capacity: Transitions it holds; the oldest is overwritten once it is full.
        state_dim: Length of a state vector.
    """

    FIELDS = ("state", "action", "reward", "next_state", "done")

    def __init__(self, capacity: int, state_dim: int) -> None:
        self.capacity = capacity
        widths = {"state": state_dim, "action": 1, "reward": 1, "next_state": state_dim, "done": 1}
        self.arrays = {name: np.zeros((capacity, widths[name]), np.float32) for name in self.FIELDS}
        self.fill, self.position = 0, 0

    @property
    def full(self) -> bool:
        return self.fill == self.capacity

    def add(self, **transition) -> None:
        for name in self.FIELDS:
            self.arrays[name][self.position] = transition[name]
        self.position = (self.position + 1) % self.capacity
        self.fill = min(self.fill + 1, self.capacity)

    def sample(self, rng: np.random.Generator, size: int) -> list:
        """`size` transitions drawn uniformly (with replacement) by `rng`, one array per field."""
        index = rng.integers(0, self.fill, size=size)
        return [self.arrays[name][index] for name in self.FIELDS]


class DDPG:
    """The DDPG agent; see the module docstring for the design and the roll-out protocol.

    Per roll-out `k` the search calls `begin_rollout(k)`, then `act(s, explore=True)` for each
    decision; once the roll-out's reward `R` is known, `remember(s, a, R, s_next, done)` for each
    decision and `train_step()` once per decision; then `end_rollout(R)`.

    Args:
        state_dim: Length of the state vector.
        low: Smallest action.
        high: Largest action (> low).
        config: Hyper-parameters; `buffer_size` must be set.
        seed: Seed of the agent's random generator, the only source of its randomness.

    Raises:
        ConfigError: If an argument is out of range or `config.buffer_size` is None.
    """

    def __init__(self, state_dim: int, low: float, high: float, config: DDPGConfig, seed: int) -> None:
        if not _integer(state_dim) or state_dim < 1:
            raise ConfigError(f"DDPG state_dim must be a positive integer, got {state_dim!r}")
        if not (_number(low) and _number(high) and low < high):
            raise ConfigError(f"DDPG needs finite low < high, got low={low!r}, high={high!r}")
        if config.buffer_size is None:
            raise ConfigError("DDPG buffer_size must be set (e.g. the warm-up roll-outs' decisions)")
        self.state_dim, self.low, self.high, self.config = int(state_dim), float(low), float(high), config
        self.rng = np.random.Generator(np.random.PCG64(seed))
        actor_names, actor = _MLP.initial(self.rng, self.state_dim, config.hidden, config.layers)
        critic_names, critic = _MLP.initial(self.rng, self.state_dim + 1, config.hidden, config.layers)
        self.actor, self.target_actor = _MLP(actor, actor_names), _MLP(actor, actor_names)
        self.perturbed_actor = _MLP(actor, actor_names)
        self.critic, self.target_critic = _MLP(critic, critic_names), _MLP(critic, critic_names)
        self.actor_adam = _Adam(self.actor.variables, config.actor_lr)
        self.critic_adam = _Adam(self.critic.variables, config.critic_lr)
        self.buffer = _ReplayBuffer(config.buffer_size, self.state_dim)
        self.baseline: float | None = None
        self.rollout = 0
        self.sigma = config.sigma(0)

        one = [tf.TensorSpec([1, self.state_dim], tf.float32)]
        self._act_clean = tf.function(lambda s: self._policy(self.actor, s), input_signature=one, autograph=False)
        self._act_perturbed = tf.function(lambda s: self._policy(self.perturbed_actor, s), input_signature=one,
                                          autograph=False)
        n, d = config.batch_size, self.state_dim
        batch = [tf.TensorSpec(shape, tf.float32) for shape in ([n, d], [n, 1], [n, 1], [n, d], [n, 1], [])]
        self._train_fn = tf.function(self._train, input_signature=batch, autograph=False)

    # === The graphs ===
    def _policy(self, net: _MLP, state: tf.Tensor) -> tf.Tensor:
        return self.low + (self.high - self.low) * tf.sigmoid(net(state))

    def _train(self, state, action, reward, next_state, done, baseline) -> tuple:
        """One critic update, one actor update (against the updated critic), then the soft target updates."""
        gamma, tau = self.config.gamma, self.config.tau
        next_q = self.target_critic(tf.concat([next_state, self._policy(self.target_actor, next_state)], axis=1))
        target = (reward - baseline) + (1.0 - done) * gamma * next_q
        with tf.GradientTape() as tape:
            q = self.critic(tf.concat([state, action], axis=1))
            critic_loss = tf.reduce_mean(tf.square(q - target))
        self.critic_adam.apply(tape.gradient(critic_loss, self.critic.variables))
        with tf.GradientTape() as tape:
            actor_loss = -tf.reduce_mean(self.critic(tf.concat([state, self._policy(self.actor, state)], axis=1)))
        self.actor_adam.apply(tape.gradient(actor_loss, self.actor.variables))
        for net, target_net in ((self.actor, self.target_actor), (self.critic, self.target_critic)):
            for var, target_var in zip(net.variables, target_net.variables):
                target_var.assign((1.0 - tau) * target_var + tau * var)
        return critic_loss, actor_loss, tf.reduce_mean(q)

    # === The roll-out protocol ===
    def begin_rollout(self, index: int) -> None:
        """Starts roll-out `index`: sets its `sigma` and, after the warm-up with parameter noise,
        draws the perturbed actor that `act(explore=True)` uses for the whole roll-out."""
        if not _integer(index) or index < 0:
            raise ConfigError(f"DDPG roll-out index must be an integer >= 0, got {index!r}")
        self.rollout, self.sigma = int(index), self.config.sigma(index)
        if self.config.noise == "param" and self.rollout >= self.config.warmup:
            noisy = []
            for value, perturb in zip(self.actor.numpy(), self.actor.perturbable()):
                if perturb:
                    value = (value + self.rng.normal(0.0, self.sigma, size=value.shape)).astype(np.float32)
                noisy.append(value)
            self.perturbed_actor.assign(noisy)

    def act(self, state, explore: bool) -> float:
        """The action for `state`, in [low, high].

        Args:
            state: A state vector of length `state_dim`.
            explore: True during the search: uniform during the warm-up roll-outs, else the
                perturbed actor ("param") or the actor plus truncated-normal noise ("tnormal").
                False: the clean actor, no noise and no random draw.
        """
        x = np.asarray(state, np.float32).reshape(1, self.state_dim)
        if explore and self.rollout < self.config.warmup:
            return float(self.rng.uniform(self.low, self.high))
        if explore and self.config.noise == "param":
            return self._clip(float(self._act_perturbed(x).numpy()[0, 0]))
        mean = self._clip(float(self._act_clean(x).numpy()[0, 0]))
        if not explore:
            return mean
        for _ in range(_TNORMAL_TRIES):
            action = float(self.rng.normal(mean, self.sigma))
            if self.low <= action <= self.high:
                return action
        return mean

    def _clip(self, action: float) -> float:
        return min(max(action, self.low), self.high)

    def remember(self, state, action: float, reward: float, next_state, done: bool) -> None:
        """Stores one transition (the oldest goes once the buffer is full); `reward` is the raw
        roll-out reward: the baseline is subtracted when it is sampled."""
        self.buffer.add(state=np.asarray(state, np.float32).reshape(self.state_dim), action=action,
                        reward=reward, next_state=np.asarray(next_state, np.float32).reshape(self.state_dim),
                        done=float(bool(done)))

    def end_rollout(self, reward: float) -> None:
        """Folds the roll-out's reward into the baseline (the first reward initialises it)."""
        reward = float(reward)
        decay = self.config.baseline_decay
        self.baseline = reward if self.baseline is None else decay * self.baseline + (1.0 - decay) * reward

    def train_step(self) -> dict | None:
        """One critic and actor update on a sampled minibatch and the soft target updates, once the
        buffer is full; else nothing (None).

        Returns:
            `{"critic_loss", "actor_loss", "q"}` floats (`q`: the minibatch's mean Q before the update), or None.
        """
        if not self.buffer.full:
            return None
        batch = self.buffer.sample(self.rng, self.config.batch_size)
        baseline = np.float32(0.0 if self.baseline is None else self.baseline)
        critic_loss, actor_loss, q = self._train_fn(*batch, baseline)
        return {"critic_loss": float(critic_loss), "actor_loss": float(actor_loss), "q": float(q)}

    # === State ===
    def _nets(self) -> dict:
        return {"actor": self.actor, "critic": self.critic, "target_actor": self.target_actor,
                "target_critic": self.target_critic, "perturbed_actor": self.perturbed_actor}

    def _slots(self) -> dict:
        """Every tf.Variable of the agent by its state_dict name."""
        out = {f"{prefix}/{name}": var for prefix, net in self._nets().items()
               for name, var in zip(net.names, net.variables)}
        for prefix, adam, net in (("adam_actor", self.actor_adam, self.actor),
                                  ("adam_critic", self.critic_adam, self.critic)):
            for name, m, v in zip(net.names, adam.m, adam.v):
                out[f"{prefix}/m/{name}"], out[f"{prefix}/v/{name}"] = m, v
        return out

    def _identity(self) -> dict:
        return {"format": STATE_FORMAT, "state_dim": self.state_dim, "low": self.low, "high": self.high,
                "config": dataclasses.asdict(self.config)}

    def state_dict(self) -> dict:
        """All the agent's state, copied: `{"arrays": {name: ndarray}, "meta": JSON-able dict}`.

        The arrays are the five networks' weights, the Adam moments and the replay buffer; the
        meta holds the random generator's state, the baseline, the buffer's fill and position, the
        roll-out index, sigma, the Adam steps, and what the agent was built with (checked on load).
        """
        arrays = {name: var.numpy() for name, var in self._slots().items()}
        arrays.update({f"buffer/{name}": value.copy() for name, value in self.buffer.arrays.items()})
        meta = {**self._identity(), "rng": self.rng.bit_generator.state, "baseline": self.baseline,
                "buffer_fill": self.buffer.fill, "buffer_position": self.buffer.position,
                "rollout": self.rollout, "sigma": self.sigma,
                "adam_steps": {"actor": int(self.actor_adam.step.numpy()),
                               "critic": int(self.critic_adam.step.numpy())}}
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict` of an agent built with the same state_dim, range and config.

        Everything is checked before anything changes.

        Raises:
            ConfigError: If the state is malformed or belongs to another agent.
        """
        try:
            arrays, meta = dict(state["arrays"]), dict(state["meta"])
            ours = json.loads(json.dumps(self._identity()))
            theirs = {**meta, **{f"config.{k}": v for k, v in dict(meta["config"]).items()}}
            ours.update({f"config.{k}": v for k, v in ours.pop("config").items()})
            differ = [key for key in ours if key not in theirs or theirs[key] != ours[key]]
            if differ:
                key = differ[0]
                raise ConfigError(f"the DDPG state was saved by another agent: its {key} is "
                                  f"{theirs.get(key)!r}, this agent's {ours[key]!r}")
            slots = self._slots()
            expected = {**{name: tuple(var.shape) for name, var in slots.items()},
                        **{f"buffer/{name}": value.shape for name, value in self.buffer.arrays.items()}}
            if set(arrays) != set(expected):
                missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
                raise ConfigError(f"the DDPG state's arrays do not match (missing {missing[:3]}, extra {extra[:3]})")
            for name, shape in expected.items():
                if arrays[name].shape != shape or not np.issubdtype(arrays[name].dtype, np.floating):
                    raise ConfigError(f"the DDPG state's {name} is {arrays[name].dtype}{list(arrays[name].shape)}, "
                                      f"expected float{list(shape)}")
            generator = np.random.PCG64()
            generator.state = meta["rng"]
            fill, position, rollout = meta["buffer_fill"], meta["buffer_position"], meta["rollout"]
            steps = (meta["adam_steps"]["actor"], meta["adam_steps"]["critic"])
            capacity = self.buffer.capacity
            if not (all(_integer(x) for x in (fill, position, rollout) + steps)
                    and 0 <= fill <= capacity and 0 <= position < capacity and rollout >= 0 and min(steps) >= 0
                    and _number(meta["sigma"]) and (meta["baseline"] is None or _number(meta["baseline"]))):
                raise ConfigError("the DDPG state's counters are out of range")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"malformed DDPG state ({type(err).__name__}: {_one_line(err)})") from None

        for name, var in slots.items():
            var.assign(np.asarray(arrays[name], np.float32))
        for name in self.buffer.arrays:
            self.buffer.arrays[name] = np.array(arrays[f"buffer/{name}"], np.float32)
        self.buffer.fill, self.buffer.position = int(fill), int(position)
        self.actor_adam.step.assign(int(steps[0]))
        self.critic_adam.step.assign(int(steps[1]))
        self.rng = np.random.Generator(generator)
        self.baseline = None if meta["baseline"] is None else float(meta["baseline"])
        self.rollout, self.sigma = int(rollout), float(meta["sigma"])


def save_agent(path: str, agent: DDPG) -> None:
    """Writes `agent.state_dict()` to `path` atomically: one `.npz` of its arrays, the meta as a
    JSON string in its `meta` entry (readable with `allow_pickle=False`)."""
    state = agent.state_dict()
    arrays = {**state["arrays"], _META_KEY: np.array(json.dumps(state["meta"], sort_keys=True))}
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_agent(path: str, agent: DDPG) -> None:
    """Restores `agent` from a `save_agent` file.

    Raises:
        ConfigError: If the file is missing, corrupt or from another agent; one line naming `path`.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{path}: not a readable DDPG agent state ({_one_line(err)})") from None
    try:
        agent.load_state_dict({"arrays": arrays, "meta": meta})
    except ConfigError as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None
