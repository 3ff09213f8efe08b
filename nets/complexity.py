"""Params and FLOPs as pure functions of an architecture and its active channel counts.

Two conventions are reported, always under their own names:

* `ekg_flops` / `ekg_params` - the EKG reference's counting, used for EKG's target rate:
  conv and dense multiply-accumulates plus BatchNorm (2 FLOPs per output element and 4 params
  per channel: gamma, beta and both moving statistics). ResNet-56: 126.8 MFLOPs, 0.86 M params.
* `macs` / `params` - plain multiply-accumulates of conv and dense layers and the trainable
  parameter count (BN gamma and beta only): what Torch-Pruning, Distiller and papers quote.

Nothing here runs a model: layers describe their shapes, a width function gives active counts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

WidthFn = Callable[[object], int]  # ChannelGroup -> active channel count


@dataclasses.dataclass(frozen=True)
class Cost:
    """Complexity of a layer or a net, in both conventions."""

    params: int = 0
    macs: int = 0
    ekg_params: int = 0
    ekg_flops: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One human-readable line that names both conventions."""
        return (
            f"EKG convention: {self.ekg_flops / 1e6:.2f} MFLOPs, {self.ekg_params / 1e6:.3f} M params | "
            f"plain: {self.macs / 1e6:.2f} MMACs, {self.params / 1e6:.3f} M params"
        )


def conv_cost(out_hw, kernel_hw, cin: int, cout: int, bias: bool, depthwise: bool = False) -> Cost:
    """A (depthwise) convolution with `cin` active inputs and `cout` active outputs."""
    kh, kw = kernel_hw
    weights = kh * kw * cin if depthwise else kh * kw * cin * cout
    macs = out_hw[0] * out_hw[1] * weights
    params = weights + (cout if bias else 0)
    return Cost(params=params, macs=macs, ekg_params=params, ekg_flops=macs)


def dense_cost(din: int, dout: int, bias: bool) -> Cost:
    params = din * dout + (dout if bias else 0)
    return Cost(params=params, macs=din * dout, ekg_params=params, ekg_flops=din * dout)


def bn_cost(hw, channels: int) -> Cost:
    # EKG counts 2 FLOPs per element (scale and shift) and all four per-channel tensors.
    return Cost(params=2 * channels, ekg_params=4 * channels, ekg_flops=hw[0] * hw[1] * channels * 2)


def net_cost(layers, width: WidthFn) -> Cost:
    """Sum of `layer.cost(width)` over layers."""
    total = Cost()
    for layer in layers:
        total = total + layer.cost(width)
    return total


def width_fn_from(widths: Mapping[str, int] | None) -> WidthFn:
    """Width function from a `{group key: count}` spec; groups not in the spec use their mask."""

    def width(group) -> int:
        if widths is not None and group.key in widths:
            return int(widths[group.key])
        return group.active()

    return width
