"""Shunt connections (Singh et al.; Haas et al. 2021): one small block in place of a run of blocks.

A net that supports shunts takes a `shunts` config value, a list of entries

    {"first": "block1", "last": "block6", "arch": 1, "expand": 192, "bottleneck": 64}

each replacing the contiguous run of the net's blocks from `first` to `last` (block names as the
net's block sites name them: MobileNetV2's `block6`, a ResNet's `BasicBlock1.2`) by a shunt.
The net builds no layer and declares no group of a replaced block; the shunt reads the group
that enters the run and writes the group that leaves it, so the shunted net is an ordinary net
of the toolkit: its spec rebuilds it, it slims, it can be pruned or quantized afterwards. Its
block site keeps the name of the run's last block.

A shunt is a chain of stages, each a 1x1 expand conv - BN - ReLU6, a 3x3 depthwise conv - BN -
ReLU6 and a 1x1 project conv - BN (linear), the last stage projecting to the run's output
channels. The architectures are the ShuntConnector's:

* arch 1 (default): two stages, expand 192, bottleneck 64, up to 2 stride-2 depthwise convs;
* arch 4: one stage, expand 128, up to 1;
* arch 5: three stages of 192 / 64, up to 3.

Stage j's depthwise conv has stride 2 when the run downsamples by more than 2^j, so the strides
follow from the shapes at both ends (a run that halves its map twice needs two stride-2
stages). The original's dilated variants (DeepLab) are not built: no net here is dilated.
Where the replaced run ends in a ReLU (a ResNet's blocks), the shunt ends in one too.

Layers are named `shunt{i}/expand{j}`, `shunt{i}/dw{j}`, `shunt{i}/project{j}` (and `_bn`),
groups `shunt{i}/expand{j}` and `shunt{i}/project{j}` (prunable: a later step may slim them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import tensorflow as tf

from nets.layers import conv_bn
from utils.errors import ConfigError

STAGES = {1: 2, 4: 1, 5: 3}  # stages of each architecture = the most stride-2 convs it can make
WIDTHS = {1: (192, 64), 4: (128, 64), 5: (192, 64)}  # (expand, bottleneck) defaults


@dataclasses.dataclass(frozen=True)
class ShuntRun:
    """One shunt: the blocks `first_index..last_index` (inclusive) of the net it replaces."""

    index: int
    first: str
    last: str
    first_index: int
    last_index: int
    arch: int
    expand: int
    bottleneck: int

    @property
    def name(self) -> str:
        return f"shunt{self.index}"

    def covers(self, k: int) -> bool:
        return self.first_index <= k <= self.last_index

    def entry(self) -> dict:
        """The config entry that rebuilds this shunt."""
        return {"first": self.first, "last": self.last, "arch": self.arch, "expand": self.expand,
                "bottleneck": self.bottleneck}


def entry(first: str, last: str, arch: int = 1, expand: int | None = None, bottleneck: int | None = None) -> dict:
    """A `shunts` config entry with the architecture's default widths filled in."""
    default = WIDTHS.get(int(arch), (192, 64))
    return {"first": first, "last": last, "arch": int(arch), "expand": int(expand or default[0]),
            "bottleneck": int(bottleneck or default[1])}


def plan(arch: str, names: Sequence[str], shunts: Sequence[Mapping] | None) -> list:
    """The `ShuntRun`s of a net's `shunts` config, checked against its block names (in order).

    Raises ConfigError, naming the blocks and the net, for an unknown block, a run whose last
    block comes before its first, overlapping runs or an unknown shunt architecture.
    """
    names = list(names)
    runs, taken = [], set()
    for i, raw in enumerate(shunts or ()):
        raw = dict(raw)
        first, last = str(raw.get("first")), str(raw.get("last"))
        for name in (first, last):
            if name not in names:
                listed = f"{names[0]} .. {names[-1]}" if names else "none"
                raise ConfigError(f"{arch}: shunt {first}..{last} names no block {name!r} of the net (its blocks: "
                                  f"{listed})")
        a, b = names.index(first), names.index(last)
        if b < a:
            raise ConfigError(f"{arch}: shunt {first}..{last} is not a contiguous run of blocks ({last} comes before "
                              f"{first})")
        if taken & set(range(a, b + 1)):
            raise ConfigError(f"{arch}: shunt {first}..{last} overlaps another shunt")
        taken |= set(range(a, b + 1))
        kind = int(raw.get("arch", 1))
        if kind not in STAGES:
            raise ConfigError(f"{arch}: shunt {first}..{last}: unknown shunt architecture {kind} (known: "
                              f"{', '.join(map(str, STAGES))})")
        full = entry(first, last, kind, raw.get("expand"), raw.get("bottleneck"))
        if full["expand"] < 1 or full["bottleneck"] < 1:
            raise ConfigError(f"{arch}: shunt {first}..{last}: widths must be positive, got {full}")
        runs.append(ShuntRun(i, first, last, a, b, kind, full["expand"], full["bottleneck"]))
    return runs


def covering(runs: Sequence[ShuntRun], k: int) -> ShuntRun | None:
    """The run that replaces block `k`, or None."""
    return next((run for run in runs if run.covers(k)), None)


def downsamples(arch: str, run: ShuntRun, in_hw, out_hw) -> int:
    """The number of stride-2 stages the shunt needs to go from `in_hw` to `out_hw`, checked."""
    ratio = in_hw[0] / out_hw[0]
    count = int(round(math.log2(ratio))) if ratio >= 1 else -1
    made = tuple(in_hw)
    for _ in range(max(count, 0)):
        made = tuple(-(-s // 2) for s in made)
    if count < 0 or made != tuple(out_hw):
        raise ConfigError(f"{arch}: shunt {run.first}..{run.last} maps {in_hw[0]}x{in_hw[1]} to "
                          f"{out_hw[0]}x{out_hw[1]}, which no chain of stride-2 convs makes")
    if count > STAGES[run.arch]:
        raise ConfigError(f"{arch}: shunt {run.first}..{run.last} halves the map {count} times; shunt arch "
                          f"{run.arch} makes at most {STAGES[run.arch]} stride-2 convs (arch 5 makes 3)")
    return count


class Shunt:
    """The layers of one shunt, declared on `net` (see the module docstring).

    Args:
        net: the `Net` being built (layers and groups are declared through it).
        run: the `ShuntRun`.
        in_group, out_group: the groups entering and leaving the replaced run.
        in_hw, out_hw: the spatial sizes at both ends.
        relu_out: end with a ReLU (the replaced run does).
    """

    def __init__(self, net, run: ShuntRun, in_group, out_group, in_hw, out_hw, relu_out: bool = False):
        self.run, self.relu_out, self.out_group = run, bool(relu_out), out_group
        strides = downsamples(net.arch, run, in_hw, out_hw)
        prefix = run.name + "/"
        count = STAGES[run.arch]
        self.stages, group, hw = [], in_group, tuple(in_hw)
        for j in range(count):
            expand = net.group(f"{prefix}expand{j}", run.expand)
            stage = {"expand": net.conv(f"{prefix}expand{j}", group, expand, 1, hw)}
            stage["expand_bn"] = net.bn(f"{prefix}expand{j}_bn", expand, hw)
            stage["dw"] = net.dwconv(f"{prefix}dw{j}", expand, 3, hw, strides=2 if strides > j else 1)
            hw = stage["dw"].out_hw
            stage["dw_bn"] = net.bn(f"{prefix}dw{j}_bn", expand, hw)
            out = out_group if j == count - 1 else net.group(f"{prefix}project{j}", run.bottleneck)
            stage["project"] = net.conv(f"{prefix}project{j}", expand, out, 1, hw)
            stage["project_bn"] = net.bn(f"{prefix}project{j}_bn", out, hw)
            self.stages.append(stage)
            group = out
        assert hw == tuple(out_hw), (hw, out_hw)
        self.layers = {layer.key: layer for stage in self.stages for layer in stage.values()}

    def __call__(self, net, x, training, tap=None):
        """The shunt's output for the run's input `x` (sites emitted through `net.site`)."""
        for j, stage in enumerate(self.stages):
            x = tf.nn.relu6(conv_bn(stage["expand"], stage["expand_bn"], x, training))
            x = net.site(tap, stage["expand_bn"].key + ":act", x, stage["expand"].out_group)
            x = tf.nn.relu6(conv_bn(stage["dw"], stage["dw_bn"], x, training))
            x = net.site(tap, stage["dw_bn"].key + ":act", x, stage["dw"].group)
            x = conv_bn(stage["project"], stage["project_bn"], x, training)
            if j < len(self.stages) - 1:
                x = net.site(tap, stage["project_bn"].key + ":act", x, stage["project"].out_group, linear=True)
        return tf.nn.relu(x) if self.relu_out else x

    def as_block(self, net, name: str, x, training, tap=None):
        """The shunt's output emitted as the block site `name` (the replaced run's last block)."""
        return net.site(tap, name, self(net, x, training, tap), self.out_group, block=True, linear=not self.relu_out)


def out_hw(hw, stride: int) -> tuple:
    """The spatial size after a SAME-padded conv of `stride` (for skipped blocks)."""
    return tuple(-(-int(s) // int(stride)) for s in hw)


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """A block of a net, as `Net.block_table` lists it: its name (its block site), whether it adds
    its input to its output (only those can be removed for a knowledge quotient), and the spatial
    sizes at its input and output. Its layers are those whose keys start with `name + "/"`."""

    name: str
    residual: bool
    in_hw: tuple
    out_hw: tuple


class Splicer:
    """Builds a net's shunts while the net builds its blocks in order: `net.block_table`'s blocks that
    a run replaces are passed to `skip` instead of being built.

    Args:
        net: the net being built.
        runs: its `ShuntRun`s (`plan`).
        relu_out: the shunts end in a ReLU (the net's blocks do).
    """

    def __init__(self, net, runs, relu_out: bool = False):
        self.net, self.runs, self.relu_out = net, list(runs), relu_out
        self._start = None

    def replaces(self, k: int) -> bool:
        return covering(self.runs, k) is not None

    def skip(self, k: int, stream, hw, stride: int, residual: bool, group_key: str, depth: int):
        """Pass over replaced block `k` (which would read `stream` at `hw`, have `stride`, add its input
        when `residual`, else open group `group_key` of `depth` channels): returns `(stream, hw,
        shunt)`, the shunt being built at the run's last block (None before). A stream the run
        opens is declared only if the run ends on it."""
        run = covering(self.runs, k)
        if k == run.first_index:
            self._start = (stream, tuple(hw))
        hw = out_hw(hw, stride)
        stream = stream if residual else None
        if k != run.last_index:
            return stream, hw, None
        stream = stream or self.net.group(group_key, depth)
        made = Shunt(self.net, run, self._start[0], stream, self._start[1], hw, relu_out=self.relu_out)
        self.net.shunt_list.append(made)
        return stream, hw, made
