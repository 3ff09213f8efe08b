"""`Net`: the base every registered network builds on.

A net declares its channel groups and layers in `__init__` (in code, never by matching names)
and writes its forward pass in `forward`; a net with dropout names the layer inputs it drops
out in training calls (`dropout_sites()`, empty by default). The base gives it, for free:

* params as `{"scope/var:0": ndarray}` dicts in the EKG pickle naming (`get_params`/`set_params`);
* a width spec (`widths()`: active channels per prunable group) that, with `arch`, `config`
  and the attached transforms, fully describes a slimmed architecture (`spec()`);
* complexity in both conventions without running the model (`cost()`);
* activation sites (`nets.sites`): `net(x, training, tap=fn)` calls `fn(site, x)` at every
  layer's input and output, wherever a group's activations are final, and at block outputs;
* parameter transforms (`nets.transforms`) attached with `attach()`, their state saved apart
  from the params (`transform_state()`); ResRep compactors on request (`add_compactors()`).

Every net is constructed as `Cls(arch=..., widths=None, masked=True, **config)`: `widths`
shrinks groups (a slimmed net), `masked=False` builds an ordinary net without mask variables.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from nets import complexity
from nets.compactor import Compactor
from nets.groups import ChannelGroup, MaskOptions
from nets.layers import FC, BatchNorm, Conv2d, DepthwiseConv2d, ForwardState, Layer
from nets.sites import Record, Site
from nets.transforms import Transform
from op_utils.recompute import recompute
from utils.errors import ConfigError
from utils.params_io import check_params


@dataclasses.dataclass(frozen=True)
class Segment:
    """A link of the forward pass: `fn(x, training, tap) -> x`, whose output depends on the
    masks of the groups in `groups` (and on its input). A search that changes one group's mask
    can reuse every earlier segment's output."""

    fn: Callable
    groups: frozenset


class Net(tf.Module):
    """Base class of the networks (see the module docstring)."""

    def __init__(self, arch: str, config: Mapping, widths: Mapping[str, int] | None = None,
                 masked: bool = True):
        super().__init__(name="".join(c if c.isalnum() else "_" for c in arch))
        self.arch = arch
        self.config = dict(config)
        self.masked = bool(masked)
        self.options = MaskOptions() if masked else None
        self.groups: dict[str, ChannelGroup] = {}
        self.layers: dict[str, Layer] = {}
        self._requested_widths = dict(widths or {})
        self.full_sizes: dict[str, int] = {}  # every group's declared size, before a width spec shrinks it
        self.state = ForwardState()
        self._recompute = False
        self._transforms: list = []  # attached transforms, in order
        self._targets: list = []  # the targets of each, as given to `attach`
        # Bookkeeping outside tf.Module's tracking (the transforms are tracked in _transforms):
        # site name -> [Transform, ...], and {name: Site} of the group and block sites.
        self._site_book = types.SimpleNamespace(transforms={}, names=None)
        # The blocks a shunt may replace (`nets.shunt.BlockInfo`, in forward order; empty for
        # nets without blocks), filled by a subclass as it builds them.
        self.block_table: list = []
        self.shunt_list: list = []  # the `nets.shunt.Shunt`s replacing some of them, in forward order

    # === Declaring the structure (used by subclasses in __init__) ===
    def group(self, key: str, size: int, prunable: bool = True) -> ChannelGroup:
        """Declare a channel group; a width spec may shrink it."""
        if key in self.groups:
            raise ValueError(f"{self.arch}: group {key!r} declared twice")
        self.full_sizes[key] = int(size)
        if prunable and key in self._requested_widths:
            width = int(self._requested_widths[key])
            if not 1 <= width <= size:
                raise ConfigError(f"{self.arch}: width {width} of group {key} is outside 1..{size}")
            size = width
        group = ChannelGroup(key, size, prunable=prunable, masked=self.masked)
        self.groups[key] = group
        return group

    def _add(self, layer: Layer) -> Layer:
        if layer.key in self.layers:
            raise ValueError(f"{self.arch}: layer {layer.key!r} declared twice")
        self.layers[layer.key] = layer
        return layer

    def conv(self, key, in_group, out_group, kernel_size, in_hw, **kwargs) -> Conv2d:
        return self._add(Conv2d(key, in_group, out_group, kernel_size, in_hw, options=self.options,
                                state=self.state, **kwargs))

    def dwconv(self, key, group, kernel_size, in_hw, **kwargs) -> DepthwiseConv2d:
        return self._add(DepthwiseConv2d(key, group, kernel_size, in_hw, options=self.options, state=self.state,
                                         **kwargs))

    def bn(self, key, group, hw, **kwargs) -> BatchNorm:
        return self._add(BatchNorm(key, group, hw, options=self.options, state=self.state, **kwargs))

    def fc(self, key, in_group, out_group, **kwargs) -> FC:
        return self._add(FC(key, in_group, out_group, options=self.options, state=self.state, **kwargs))

    def _check_widths_used(self) -> None:
        """Call at the end of a subclass __init__: a width spec may only name real groups."""
        unknown = sorted(set(self._requested_widths) - {k for k, g in self.groups.items() if g.prunable})
        if unknown:
            raise ConfigError(f"{self.arch}: width spec names unknown group {unknown[0]!r}")

    # === Forward ===
    def forward(self, x, training: bool, tap=None):
        """The forward pass; calls `self.site(tap, ...)` wherever a group's activations are final
        and at every block output."""
        raise NotImplementedError

    def dropout_sites(self) -> dict:
        """`{"<layer key>:in": rate}`: the `layer_in` sites whose input a training call drops out
        (inverted dropout at `rate`), in forward order; only rates > 0, `{}` without dropout."""
        return {}

    def segments(self) -> list:
        """The forward pass as a chain of `Segment`s; one segment unless a net splits it."""
        return [Segment(self.forward, frozenset(self.groups))]

    def __call__(self, x, training: bool = False, tap=None):
        """Logits of `x`. `training` selects BN batch statistics (and moving-statistics updates).

        `tap`, if given, is called as `x = tap(site, x)` at every activation site (`nets.sites`):
        each layer's input and output, every point where a channel group's activations are final
        (after BN+ReLU, after a residual add), every block output. It returns the tensor the
        forward pass goes on with: its input to observe (scores, records), another tensor of the
        same shape to replace it.

        With `set_recompute(True)`, a training call runs segment by segment under
        `op_utils.recompute`: same values and gradients, activation memory of one segment.
        """
        with self.state.tapping(tap), self.state.mode(training):
            segments = self.segments() if training and self._recompute else []
            if len(segments) < 2:  # one segment: recomputing it all would keep all of it anyway
                return self.forward(x, training, tap)
            for segment in segments:
                x = recompute(lambda y, fn=segment.fn: fn(y, True, tap), x, self.state.replay)
            return x

    def forward_until(self, x, done: Callable[[], bool], training: bool = False, tap=None):
        """The forward pass segment by segment, stopping after the first segment at whose end
        `done()` is true (a tap has recorded what it needs): the rest of the net is neither traced
        nor run. Returns that segment's output (the logits if it never stops)."""
        with self.state.tapping(tap), self.state.mode(training):
            for segment in self.segments():
                x = segment.fn(x, training, tap)
                if done():
                    break
        return x

    def set_recompute(self, on: bool) -> None:
        """Trade compute for memory in training calls (see `__call__`). A trace-time switch:
        set it before the training step is traced."""
        self._recompute = bool(on)

    def site(self, tap, name: str, x, group: ChannelGroup, block: bool = False, linear: bool = False):
        """Emit site `name` on `x`: a block output (`block=True`) or a point where `group`'s
        activations are final (kind `group`); `linear` marks one that does not follow a ReLU.
        Transforms attached to the site apply first; returns what the tap returns."""
        for transform in self._site_book.transforms.get(name, ()):
            x = transform(x)
        if tap is None:
            return x
        return tap(Site(name, "block" if block else "group", group, linear=linear), x)

    def sites(self, training: bool = False) -> list:
        """Every activation site of one forward pass, in order (one eager call on a zero input)."""
        record = Record()
        size = self.config.get("input_size", 28)
        channels = self.groups["input"].size if "input" in self.groups else 1
        self(tf.zeros([1, size, size, channels]), training=training, tap=record)
        return list(record.sites.values())

    # === Parameters ===
    def param_vars(self) -> dict:
        """`{"scope/var:0": tf.Variable}` in declaration order."""
        return {f"{layer.key}/{name}:0": var for layer in self.layers.values() for name, var in layer.named.items()}

    def param_shapes(self) -> dict:
        return {key: tuple(var.shape) for key, var in self.param_vars().items()}

    def get_params(self) -> dict:
        """Numpy copies of all parameters (moving statistics averaged over replicas)."""
        return {key: np.asarray(var.numpy()) for key, var in self.param_vars().items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Assign a params dict; a dict for another architecture names its first misfits."""
        check_params(self.param_shapes(), params, what=self.arch)
        for key, var in self.param_vars().items():
            var.assign(np.asarray(params[key], np.float32))

    # === Widths and complexity ===
    def prunable_groups(self) -> dict:
        return {k: g for k, g in self.groups.items() if g.prunable}

    def widths(self) -> dict:
        """Active channels of every prunable group: the width spec of the current masks."""
        return {k: g.active() for k, g in self.prunable_groups().items()}

    def reset_masks(self) -> None:
        for group in self.groups.values():
            group.reset()

    def cost(self, widths: Mapping[str, int] | None = None) -> complexity.Cost:
        """Params and FLOPs (both conventions) for `widths` (default: the current masks)."""
        return complexity.net_cost(self.layers.values(), complexity.width_fn_from(widths))

    def spec(self) -> dict:
        """Everything needed to rebuild this architecture: arch, config, widths and, if any,
        the saved transforms (`{"kind", "config", "targets"}`; their state: `transform_state()`)."""
        spec = {"arch": self.arch, "config": _plain(self.config), "widths": self.widths()}
        saved = [{"kind": t.kind, "config": t.config(), "targets": list(targets)}
                 for t, targets in self.attachments() if t.saved]
        return {**spec, "transforms": saved} if saved else spec

    def widths_from_shapes(self, shapes: Mapping[str, tuple]) -> dict:
        """Infer the width spec implied by stored parameter shapes (EKG pickles carry no spec)."""
        widths = {}
        for layer in self.layers.values():
            names = {n: tuple(shapes[f"{layer.key}/{n}:0"]) for n in layer.named if f"{layer.key}/{n}:0" in shapes}
            if len(names) != len(layer.named):
                continue  # check_params will name the missing key
            for key, width in layer.infer_widths(names).items():
                if self.groups[key].prunable:
                    widths.setdefault(key, int(width))
        return widths

    # === Transforms ===
    def attach(self, transform: Transform, targets: Sequence[str]) -> Transform:
        """Attach `transform` to parameters (`"<layer key>/<param>"`) or layer outputs
        (`"<layer key>:out"`), in that order after any transform already there.

        Call it before anything is traced, in the strategy scope the net will train in (a
        transform may create variables), and before loading its state.
        """
        targets = list(targets)
        if not targets:
            raise ValueError(f"{self.arch}: {transform.kind} attached to no target")
        for target in targets:
            if not self._names_layer(target) and target in self.final_sites():
                self._site_book.transforms.setdefault(target, []).append(transform)
                transform.attached(None, target)
                continue
            layer, where = self._target(target)
            if where == ":out":
                layer.out_transforms.append(transform)
            else:
                layer.transforms[where] = [*layer.transforms.get(where, ()), transform]  # through the tracking wrapper
            transform.attached(layer, target)
        self._transforms.append(transform)
        self._targets.append(tuple(targets))
        return transform

    def _names_layer(self, target: str) -> bool:
        """Whether `target` names a layer output or parameter (no forward pass needed to tell)."""
        key = target[:-4] if target.endswith(":out") else target.rpartition("/")[0]
        return key in self.layers

    def _target(self, target: str):
        if target.endswith(":out"):
            key, where = target[:-4], ":out"
        else:
            key, _, where = target.rpartition("/")
        layer = self.layers.get(key)
        if layer is None or (where != ":out" and where not in layer.named):
            raise ConfigError(f"{self.arch}: no layer output, parameter or activation site {target!r} to attach a "
                              "transform to")
        return layer, where

    def final_sites(self) -> dict:
        """`{name: Site}` of the `group` and `block` sites (found once, by one eager call)."""
        if self._site_book.names is None:
            self._site_book.names = {s.name: s for s in self.sites() if s.final}
        return self._site_book.names

    def attachments(self) -> list:
        """`[(transform, targets)]` in the order they were attached."""
        return list(zip(self._transforms, self._targets))

    def transform_state(self) -> dict:
        """`{"t<i>/<name>": ndarray}`: the state of the saved transforms, i in spec order."""
        saved = [t for t in self._transforms if t.saved]
        return {f"t{i}/{name}": array for i, t in enumerate(saved) for name, array in t.state_arrays().items()}

    def load_transform_state(self, arrays: Mapping[str, np.ndarray], what: str = "") -> None:
        """Assign what `transform_state()` returned (for example read back from a file)."""
        saved = [t for t in self._transforms if t.saved]
        for i, transform in enumerate(saved):
            prefix = f"t{i}/"
            transform.load_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)},
                                 what=what or self.arch)

    # === ResRep compactors ===
    @property
    def compactors(self) -> dict:
        """`{group key: Compactor}`; empty unless `add_compactors()` was called."""
        return {t.group.key: t for t in self._transforms if isinstance(t, Compactor)}

    def compacted_pairs(self) -> list:
        """`(conv, bn)` of every BN that applies a compactor, with the conv it normalises."""
        layers = list(self.layers.values())
        return [(conv, bn) for conv, bn in zip(layers, layers[1:])
                if isinstance(bn, BatchNorm) and bn.compactor is not None]

    def add_compactors(self, keys=None) -> dict:
        """ResRep's re-parameterisation: a compactor (identity 1x1 conv) per eligible group.

        A prunable group is eligible when every layer writing into it is a `Conv2d` declared
        right before a BatchNorm of the group (conv, BN, then compactor: foldable into the conv)
        and no depthwise conv filters it (a compactor cannot be folded into a depthwise conv,
        and a channel it closes would leave the depthwise BN's constant output behind). All
        BNs of an eligible group apply its one compactor, so a residual stream has one.
        Groups without BatchNorm (dense layers, LeNet-5) get none and keep their width.

        Call it once, on an unmasked net (ResRep's forward pass is unmasked), in the strategy
        scope the net will train in and before the net is first called.

        Args:
            keys: consider only these groups (default: all).

        Returns:
            `{group key: Compactor}` of the new compactors.
        """
        if self.masked:
            raise ValueError(f"{self.arch}: compactors need a net built with masked=False")
        if self.compactors:
            raise ValueError(f"{self.arch}: the net already has compactors")
        layers = list(self.layers.values())
        before = dict(zip(map(id, layers[1:]), layers))  # each layer -> the one declared before it
        after = dict(zip(map(id, layers), layers[1:]))
        eligible = dict.fromkeys(self.prunable_groups(), True)

        def conv_then_bn(conv, bn):
            return isinstance(conv, Conv2d) and isinstance(bn, BatchNorm) and conv.out_group is bn.group \
                and len(bn.axes_rank) == 3

        for layer in layers:
            if isinstance(layer, DepthwiseConv2d):
                eligible[layer.group.key] = False
            elif isinstance(layer, (Conv2d, FC)) and layer.out_group.key in eligible:
                eligible[layer.out_group.key] &= conv_then_bn(layer, after.get(id(layer)))
            elif isinstance(layer, BatchNorm) and layer.group.key in eligible:
                eligible[layer.group.key] &= conv_then_bn(before.get(id(layer)), layer)
        wanted = set(eligible if keys is None else keys)
        added = {}
        for key in eligible:
            if eligible[key] and key in wanted:
                bns = [bn.key for bn in layers if isinstance(bn, BatchNorm) and bn.group.key == key]
                added[key] = self.attach(Compactor(self.groups[key]), [f"{b}:out" for b in bns])
        return added


def _plain(value):
    """`value` with tf.Module's tracking wrappers of lists and dicts turned back into plain ones (JSON)."""
    if hasattr(value, "keys"):  # a dict, or tf.Module's _DictWrapper (a proxy, not a Mapping)
        return {k: _plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListWrapper":
        return [_plain(v) for v in value]
    return value
