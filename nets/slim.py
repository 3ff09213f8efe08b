"""Physical slimming: from any mask setting, an ordinary smaller net with the kept weights.

The slimmed net is a fresh instance of the same class built with the width spec of the masks
(`masked=False`: no mask variables, narrower variables). Each layer gathers its kept input and
output channels; when `options.renorm` is on, the kernel keeps the masked kernel's rescaling so
the slimmed net computes exactly what the masked net computed.
"""

from __future__ import annotations


def slim(net, masked: bool = False):
    """Return a new, physically smaller net equal to `net` under its current masks.

    Args:
        net: a built `Net` (masked or not).
        masked: build the result with fresh (all-ones) masks so it can be pruned again.
    """
    # Rebuilding from the class (not the registry) also slims a user's unregistered Net.
    small = type(net)(arch=net.arch, widths=net.widths(), masked=masked, **net.config)
    for key, layer in net.layers.items():
        target = small.layers[key]
        for name, array in layer.sliced().items():
            target.named[name].assign(array)
    return small
