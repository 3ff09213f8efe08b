"""The environments of the policy search (`codebase.policy_search`): one decision per layer.

A roll-out walks an environment's decisions in order: at each, the agent sees a state vector and
proposes an action in [0, 1]; the environment maps it to a setting, clips it so the budget stays
reachable whatever the later actions are, and records it. The finished policy is applied to the
search net by assigning variables (channel masks, magnitude masks, quantizer choices), so one
traced evaluation serves every roll-out.

* `ChannelEnv` (He et al.'s AMC, PocketFlow's `cp` auto protocol): a preserve ratio per channel
  group that channel pruning prunes, in [`min_ratio`, 1]. A group's width is capped so that, with
  every later group at its minimum, the FLOPs (EKG convention) stay at or under the target. The
  channels kept are chosen by the inner pruner, `select(group, count)`: by default the largest-L1
  filters of the trained net; `--rl_pruner cp` passes LASSO's choice (He et al.). State (AMC):
  position, group size, input channels, kernel area and stride of its readers, its input map
  size, its layers' FLOPs, the FLOPs removed so far, the FLOPs of the groups still to come, the
  previous action.
* `SparsityEnv` (PocketFlow's `ws` optimal protocol): a sparsity per conv/dense kernel in
  `[max(0, 1 - 3 (1 - s_f)), 1 - (1 - s_f) / 3]`, the first layer and the classifier fixed at 0,
  both bounds moved so the parameter-weighted sparsity ends exactly at `s_f` (the last decision
  is forced). Masks keep the largest magnitudes of the trained kernels. State: one-hot layer,
  kernel shape, #params, pruned fraction of the budget so far, #params still to come, the
  previous action.
* `BitsEnv` (PocketFlow's RL bit allocation): integer weight bits per quantized layer in
  [`low`, `high`] under `equivalent bits x #params`: bits are capped so every later layer can
  still get `low`, and the last layer takes what is left (capped at `high`). Layers are visited
  in a random order each roll-out (`begin(rng)`). State: one-hot layer, kernel shape, #params,
  the budget left, #params still to come, the previous action.

Each environment writes its policy in the format of the learner that takes it: `{group: preserve
ratio}` (`--cp_ratio_file`), `{layer: sparsity}` (`--ws_ratio_file`), `{layer: bits}`
(`--uq_bits_file`, `--nuq_bits_file`).
"""

from __future__ import annotations

import math

import numpy as np

from codebase.budget import FlopsBudget
from codebase.importance import filter_l1, keep_top
from nets.layers import Conv2d
from utils.errors import ConfigError


def _normalised(rows) -> np.ndarray:
    """Columns scaled by their largest magnitude (a zero column stays zero)."""
    table = np.asarray(rows, np.float64)
    top = np.abs(table).max(axis=0)
    return table / np.where(top > 0, top, 1.0)


def _shape4(kernel) -> list:
    """A kernel's shape as `[kh, kw, c_in, c_out]` (a dense kernel as `[1, 1, in, out]`)."""
    shape = [int(d) for d in kernel.shape]
    return [1] * (4 - len(shape)) + shape


class Env:
    """Shared bookkeeping of the environments: decision keys, order, the settings taken so far."""

    kind = ""

    def __init__(self, keys):
        self.keys = list(keys)
        if not self.keys:
            raise ConfigError(f"policy search ({self.kind}): the net has nothing to decide")
        self.order = list(range(len(self.keys)))
        self.values: dict = {}
        self.previous = 0.0

    @property
    def state_dim(self) -> int:
        return len(self.state(0))

    def begin(self, rng: np.random.Generator | None = None) -> None:
        """Start a roll-out (nothing decided yet)."""
        del rng
        self.values, self.previous = {}, 0.0

    def state(self, position: int) -> np.ndarray:
        raise NotImplementedError

    def take(self, position: int, action: float) -> float:
        """Record the decision at `position` for `action` in [0, 1]; returns the action actually
        taken (after clipping), in [0, 1]."""
        raise NotImplementedError

    def policy(self) -> dict:
        """`{key: setting}` of the finished roll-out, in the net's order."""
        return {k: self.values[k] for k in self.keys}

    def apply(self, policy: dict) -> None:
        raise NotImplementedError

    def summary(self, policy: dict) -> dict:
        raise NotImplementedError

    def payload(self, policy: dict) -> dict:
        """The learner's list file for `policy`."""
        return dict(policy)


class ChannelEnv(Env):
    """Preserve ratios of channel groups under a FLOPs target (see the module docstring).

    Args:
        net: the masked search net (trained weights).
        groups: keys of the groups to decide, in network order (`channel_stats.problems`).
        target_rate: FLOPs at most this fraction of the unpruned net's.
        min_ratio: the smallest preserve ratio of a group.
        select: `select(group key, count)` -> the indices of the channels a roll-out keeps; None:
            the `count` largest-L1 filters.
    """

    kind = "channels"

    def __init__(self, net, groups, target_rate: float, min_ratio: float, select=None):
        super().__init__(groups)
        self.net, self.target_rate, self.min_ratio = net, float(target_rate), float(min_ratio)
        self.budget = FlopsBudget(net)
        self.size = {k: net.groups[k].size for k in self.keys}
        self.lowest = {k: max(1, int(round(min_ratio * n))) for k, n in self.size.items()}
        self.limit = target_rate * self.budget.full_flops
        floor = self.budget.total({**self.budget.full, **self.lowest})
        if floor > self.limit:
            raise ConfigError(f"--search_target_rate {target_rate} is below {floor / self.budget.full_flops:.4f}, the "
                              f"FLOPs of {net.arch} with every pruned group at --rl_min_ratio {min_ratio}")
        if select is None:
            scores = filter_l1(net)
            select = lambda key, count: keep_top(scores, {key: count})[key]  # noqa: E731
        self.select = select
        static = []
        for k in self.keys:
            readers = [layer for layer in self.budget.touching[k] if isinstance(layer, Conv2d) and layer.in_group.key == k]
            full = self.budget.full
            flops = self.budget.total(full) - self.budget.total({**full, k: self.lowest[k]})
            static.append([self.size[k], max([r.in_group.size for r in readers] or [0]),
                           max([r.kernel_size[0] * r.kernel_size[1] for r in readers] or [1]),
                           max([r.strides for r in readers] or [1]),
                           max([r.out_hw[0] * r.strides for r in readers] or [1]), flops])
        self.static = _normalised(static)
        # FLOPs each group's own layers carry at full width, for the "still to come" feature.
        self.share = np.asarray([row[-1] for row in static], np.float64) / max(self.budget.full_flops, 1)

    def widths(self, decided: dict, rest: str = "lowest") -> dict:
        """Every prunable group's width: decided ones as decided, the other decisions at their lowest
        (or `rest="full"`), the groups not decided here at full width."""
        widths = dict(self.budget.full)
        for k in self.keys:
            widths[k] = decided.get(k, self.lowest[k] if rest == "lowest" else self.size[k])
        return widths

    def state(self, position):
        removed = 1.0 - self.budget.total(self.widths(self.values, rest="full")) / self.budget.full_flops
        later = float(self.share[position + 1:].sum())
        return np.asarray([position / len(self.keys), *self.static[position], removed, later, self.previous],
                          np.float32)

    def take(self, position, action):
        k = self.keys[position]
        action = float(np.clip(action, 0.0, 1.0))
        wanted = max(self.lowest[k], int(round((self.min_ratio + action * (1.0 - self.min_ratio)) * self.size[k])))
        low, high = self.lowest[k], min(wanted, self.size[k])
        while low < high:  # the widest width <= wanted that keeps the target reachable
            mid = (low + high + 1) // 2
            if self.budget.total(self.widths({**self.values, k: mid})) <= self.limit:
                low = mid
            else:
                high = mid - 1
        self.values[k] = low
        taken = (low / self.size[k] - self.min_ratio) / (1.0 - self.min_ratio) if self.min_ratio < 1 else 1.0
        self.previous = float(np.clip(taken, 0.0, 1.0))
        return self.previous

    def uniform(self) -> dict:
        """The widths of one keep fraction for every decided group at the target (the uniform protocol)."""
        widths = self.budget.widths_at_rate(dict.fromkeys(self.keys, 1.0), self.target_rate, only=set(self.keys))
        return {k: max(self.lowest[k], widths[k]) for k in self.keys}

    def apply(self, policy):
        for k in self.keys:
            self.net.groups[k].keep(self.select(k, int(policy[k])))

    def summary(self, policy):
        return {"flops_rate": self.budget.rate(self.widths(policy))}

    def payload(self, policy):
        return {k: policy[k] / self.size[k] for k in self.keys}


class SparsityEnv(Env):
    """Per-layer sparsities under a global sparsity (see the module docstring).

    Args:
        kernels: `{layer key: kernel array}` of every masked layer (trained values), in order.
        masks: `{layer key: MagnitudeMask}` on the search net.
        target: the parameter-weighted sparsity s_f.
        fixed: keys held at sparsity 0 (the first layer and the classifier).
    """

    kind = "sparsity"

    def __init__(self, kernels: dict, masks: dict, target: float, fixed=()):
        self.fixed = [k for k in kernels if k in set(fixed)]
        super().__init__([k for k in kernels if k not in set(fixed)])
        self.kernels, self.masks, self.target = kernels, masks, float(target)
        self.params = {k: int(np.prod(v.shape)) for k, v in kernels.items()}
        self.total = sum(self.params.values())
        self.low = max(0.0, 1.0 - 3.0 * (1.0 - target))
        self.high = 1.0 - (1.0 - target) / 3.0
        decided = sum(self.params[k] for k in self.keys)
        if self.target * self.total > self.high * decided + 1e-9:
            raise ConfigError(f"--ws_sparsity {target}: with the first layer and the classifier dense, the other "
                              f"layers cannot reach it within PocketFlow's bound {self.high:.4f}")
        rows = [[*_shape4(kernels[k]), self.params[k]] for k in self.keys]
        self.static = np.concatenate([np.eye(len(self.keys)), _normalised(rows)], axis=1)

    def bounds(self, position: int) -> tuple:
        """`(lowest, highest)` sparsity of the decision at `position` given the earlier ones."""
        k = self.keys[position]
        pruned = sum(self.values[j] * self.params[j] for j in self.keys[:position])
        rest = sum(self.params[j] for j in self.keys[position + 1:])
        need = self.target * self.total - pruned
        lower = (need - self.high * rest) / self.params[k]
        upper = (need - self.low * rest) / self.params[k]
        return max(self.low, lower), min(self.high, upper)

    def state(self, position):
        pruned = sum(self.values[j] * self.params[j] for j in self.keys[:position])
        rest = sum(self.params[j] for j in self.keys[position + 1:])
        return np.asarray([*self.static[position], pruned / (self.target * self.total), rest / self.total,
                           self.previous], np.float32)

    def take(self, position, action):
        action = float(np.clip(action, 0.0, 1.0))
        lower, upper = self.bounds(position)
        value = float(np.clip(self.low + action * (self.high - self.low), lower, max(lower, upper)))
        self.values[self.keys[position]] = value
        self.previous = (value - self.low) / (self.high - self.low) if self.high > self.low else 0.0
        return self.previous

    def policy(self):
        return {k: (self.values[k] if k in self.values else 0.0) for k in self.kernels}

    def uniform(self) -> dict:
        return dict.fromkeys(self.kernels, self.target)

    def apply(self, policy):
        for k, mask in self.masks.items():
            mask.keep_largest(self.kernels[k], min(float(policy[k]), 1.0 - 1e-9))

    def summary(self, policy):
        return {"sparsity": sum(policy[k] * self.params[k] for k in self.kernels) / self.total}


class BitsEnv(Env):
    """Per-layer weight bits under an equivalent-bits budget (see the module docstring).

    Args:
        kernels: `{layer key: kernel array}` of every quantized layer, in order.
        choices: `{layer key: QuantizerChoice}` on the search net, choice i = `low + i` bits.
        bits: the equivalent bits (parameter-weighted mean) of the budget.
        low, high: the bit range.
    """

    kind = "bits"

    def __init__(self, kernels: dict, choices: dict, bits: float, low: int = 2, high: int = 8):
        super().__init__(kernels)
        self.kernels, self.choices = kernels, choices
        self.low, self.high, self.bits = int(low), int(high), float(bits)
        if not self.low <= self.bits <= self.high:
            raise ConfigError(f"equivalent bits {bits} must be within the search's range [{low}, {high}]")
        self.params = {k: int(np.prod(v.shape)) for k, v in kernels.items()}
        self.total = sum(self.params.values())
        self.budget = self.bits * self.total
        rows = [[*_shape4(kernels[k]), self.params[k]] for k in self.keys]
        self.static = np.concatenate([np.eye(len(self.keys)), _normalised(rows)], axis=1)

    def begin(self, rng=None):
        super().begin()
        self.order = list(range(len(self.keys))) if rng is None else [int(i) for i in rng.permutation(len(self.keys))]

    def _left(self, position):
        used = sum(self.values[self.keys[i]] * self.params[self.keys[i]] for i in self.order[:position])
        rest = sum(self.params[self.keys[i]] for i in self.order[position + 1:])
        return used, rest

    def state(self, position):
        i = self.order[position]
        used, rest = self._left(position)
        return np.asarray([*self.static[i], 1.0 - used / self.budget, rest / self.total, self.previous], np.float32)

    def take(self, position, action):
        k = self.keys[self.order[position]]
        action = float(np.clip(action, 0.0, 1.0))
        used, rest = self._left(position)
        cap = math.floor((self.budget - used - self.low * rest) / self.params[k] + 1e-9)
        if position == len(self.keys) - 1:
            value = min(self.high, cap)  # the last layer takes what is left
        else:
            value = min(self.low + int(round(action * (self.high - self.low))), cap, self.high)
        value = max(self.low, value)
        self.values[k] = int(value)
        self.previous = (value - self.low) / (self.high - self.low) if self.high > self.low else 0.0
        return self.previous

    def uniform(self) -> dict:
        """Every layer at the floor of the equivalent bits."""
        return dict.fromkeys(self.keys, int(math.floor(self.bits + 1e-9)))

    def apply(self, policy):
        for k, choice in self.choices.items():
            choice.choice.assign(int(policy[k]) - self.low)

    def summary(self, policy):
        return {"equivalent_bits": sum(policy[k] * self.params[k] for k in self.keys) / self.total}
