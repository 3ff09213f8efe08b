"""Activation sites: named places in a forward pass where a method may read or replace a tensor.

Every net emits its sites when it is called with a `tap`: `net(x, training, tap=fn)` calls
`x = fn(site, x)` at each of them, in forward order, and uses what `fn` returns. A tap that
returns its input unchanged only observes (EKG's score taps, `Record`); one that returns another
tensor of the same shape replaces the activation (a shunt, a fake quantizer). Sites cost nothing
without a tap, and a tap only adds the ops it builds itself, so one traced forward pass can
record every site a method needs.

Kinds of site:

* `group`: where a channel group's activations are final inside a block (after BN + ReLU,
  after a max-pool), named `<layer key>:act` after the layer whose output it is; `site.group`
  is the group.
* `block`: the output of a named block of the net (a ResNet's `stem` and `BasicBlock1.2`,
  MobileNetV2's `block5` and `head`, VGG's `stage3`); its input is the previous block's
  output. It is also where `site.group` is final: a residual stream is final after every block
  that writes into it. Feature distillation, shunts and discrimination-aware pruning address
  blocks by these names.
* `layer_in` / `layer_out`: the input and the output of every conv, depthwise conv, dense and
  BatchNorm layer, named `<layer key>:in` / `<layer key>:out`; `site.group` is the layer's
  input or output group and `site.layer` the layer (channel pruning reads a conv's X and Y).

`Site.final` marks the `group` and `block` sites: the places where EKG gates a group. Every one
follows a ReLU (or ReLU6, or a max-pool of one) except those marked `linear` (MobileNetV2's block
outputs). Transforms can be attached to `group` and `block` sites by name (`Net.attach`), like
activation quantizers, which then run on every call, tap or not.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

KINDS = ("group", "layer_in", "layer_out", "block")


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One named place in a forward pass (see the module docstring)."""

    name: str
    kind: str
    group: object = None  # ChannelGroup of the channels at this site, if one describes them
    layer: object = None  # the layer, for layer_in / layer_out sites
    linear: bool = False  # a group/block site not after a ReLU (MobileNetV2's linear bottlenecks)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"site {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def final(self) -> bool:
        """True where `group`'s activations are final (kinds `group` and `block`)."""
        return self.kind in ("group", "block")

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {self.kind})"


Tap = Callable[[Site, object], object]


class Record:
    """A tap that keeps the tensors of the sites it selects: `values[site.name]`.

    Use a fresh `Record` per call; inside a `tf.function`, return `record.values` (or what is
    computed from it) from the function.

    Args:
        select: which sites to keep: a collection of site names, a kind (`"layer_in"`), or a
            predicate of the `Site`. Default: every site.

    Example:
        >>> record = Record("block")
        >>> logits = net(images, training=False, tap=record)
        >>> record.values["BasicBlock1.0"].shape
    """

    def __init__(self, select=None):
        self.select = _selector(select)
        self.values: dict = {}
        self.sites: dict = {}

    def __call__(self, site: Site, x):
        if self.select(site):
            self.values[site.name] = x
            self.sites[site.name] = site
        return x


class Replace:
    """A tap that replaces the tensors of named sites: `replace[name](x) -> new x` (same shape)."""

    def __init__(self, replace: Mapping[str, Callable]):
        self.replace = dict(replace)
        self.seen: set = set()

    def __call__(self, site: Site, x):
        fn = self.replace.get(site.name)
        if fn is None:
            return x
        self.seen.add(site.name)
        return fn(x)


def chain(*taps) -> Tap:
    """One tap that calls each of `taps` in turn (None entries are skipped)."""
    taps = [t for t in taps if t is not None]

    def tap(site, x):
        for t in taps:
            x = t(site, x)
        return x

    return tap


def only(kind: str, tap: Tap) -> Tap:
    """`tap` restricted to sites of one kind; every other site passes through untouched."""

    def restricted(site, x):
        return tap(site, x) if site.kind == kind else x

    return restricted


def _selector(select) -> Callable[[Site], bool]:
    if select is None:
        return lambda site: True
    if callable(select):
        return select
    if isinstance(select, str):
        if select not in KINDS:
            raise ValueError(f"unknown site kind {select!r}; kinds: {', '.join(KINDS)}")
        return lambda site: site.kind == select
    names = frozenset(select)
    return lambda site: site.name in names
