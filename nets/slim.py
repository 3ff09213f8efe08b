"""Physical slimming: from any mask setting, an ordinary smaller net with the kept weights.

The slimmed net is a fresh instance of the same class built with the width spec of the masks
(`masked=False`: no mask variables, narrower variables). Each layer gathers its kept input and
output channels; when `options.renorm` is on, the kernel keeps the masked kernel's rescaling so
the slimmed net computes exactly what the masked net computed. Every saved transform
(`nets.transforms`) is rebuilt on the slimmed net with its state gathered the same way.

`pad_channels` goes the other way for deployment: CPU convolution kernels work on blocks of 8
(AVX2) or 16 channels, so a slimmed net with odd widths (1, 7, 13, ...) can be slower than its
FLOPs suggest; padding every width up to a multiple with inert zero channels keeps the outputs
and lets the kernels run full blocks (`docs/benchmarks.md`, latency).
"""

from __future__ import annotations

from nets import axes as ax
from nets.complexity import width_fn_from


def _check_resizable(net, how: str) -> None:
    for transform, _ in net.attachments():
        transform.check_resize(how)


def _carry_transforms(source, target, resize) -> None:
    """Attach `source`'s saved transforms to `target` (same layer keys), state resized by
    `resize(array, axes)`."""
    for transform, targets in source.attachments():
        if not transform.saved:
            continue
        new = target.attach(type(transform).from_config(transform.config(), target), targets)
        axes = transform.state_axes()
        new.load_state({name: resize(array, axes.get(name, ())) for name, array in transform.state_arrays().items()},
                       what=target.arch)


def slim(net, masked: bool = False):
    """Return a new, physically smaller net equal to `net` under its current masks.

    Args:
        net: a built `Net` (masked or not).
        masked: build the result with fresh (all-ones) masks so it can be pruned again.
    """
    _check_resizable(net, "slimmed")
    # Rebuilding from the class (not the registry) also slims a user's unregistered Net.
    small = type(net)(arch=net.arch, widths=net.widths(), masked=masked, **net.config)
    for key, layer in net.layers.items():
        target = small.layers[key]
        for name, array in layer.sliced().items():
            target.named[name].assign(array)
    _carry_transforms(net, small, ax.gather)
    return small


def pad_channels(net, multiple: int = 8):
    """A copy of `net` (slimmed first if masked) whose prunable groups have a multiple of
    `multiple` channels (at most the architecture's full width), with the same outputs in
    inference mode.

    New channels are inert: zero kernel slices in and out, zero bias, BN gamma and beta 0 (and
    moving variance 1), so each one is exactly 0 wherever it appears, residual streams included.
    Transform state grows with zeros. It is an inference layout: training it would move the new
    channels' BN betas.
    """
    if net.compactors:
        raise ValueError(f"{net.arch}: fold the ResRep compactors (nets.compactor.fold) before padding")
    if multiple < 1:
        raise ValueError(f"pad_channels: multiple must be >= 1, got {multiple}")
    _check_resizable(net, "padded")
    source = slim(net) if net.masked else net
    widths = {k: min(-(-w // multiple) * multiple, net.full_sizes[k]) for k, w in source.widths().items()}
    padded = type(net)(arch=net.arch, widths=widths, masked=False, **net.config)
    width = width_fn_from(widths)
    for key, layer in source.layers.items():
        for name, array in layer.padded(width).items():
            padded.layers[key].named[name].assign(array)
    _carry_transforms(source, padded, lambda array, axes: ax.pad(array, axes, width))
    return padded
