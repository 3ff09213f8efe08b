"""Deployment form of a net: its parameter transforms baked into plain parameters.

A quantized or sparse net computes with transformed parameters (`Layer.param`: fake-quantized
kernels, magnitude-masked kernels). `baked(net)` returns a new net of the same architecture whose
stored parameters *are* those values, with the parameter transforms dropped and every other
transform (activation quantizers at sites, layer-output transforms) kept with its state. It
computes what `net(x, training=False)` computes, with no quantization op left on the weights,
which is what an exported file should hold (`codebase.export`) and what the packed params file
reloads into (`codebase.packed`).
"""

from __future__ import annotations

from utils.errors import ConfigError


def parameter_transforms(net) -> list:
    """`[(transform, targets)]` of the transforms attached to parameters."""
    sites = net.final_sites() if net.attachments() else {}
    return [(t, targets) for t, targets in net.attachments()
            if not any(target.endswith(":out") or target in sites for target in targets)]


def baked(net):
    """A net computing `net(x, training=False)` whose parameters hold their transformed values.

    Returns `net` itself when it has no parameter transform. A masked net must be slimmed first.
    """
    weight_transforms = parameter_transforms(net)
    if not weight_transforms:
        return net
    if net.masked:
        raise ConfigError(f"{net.arch}: slim the masked net (nets.slim) before baking its transforms")
    plain = type(net)(arch=net.arch, widths=net.widths(), masked=False, **net.config)
    params = {}
    for layer in net.layers.values():
        for name in layer.named:
            params[f"{layer.key}/{name}:0"] = layer.param(name).numpy() if layer.transforms.get(name) \
                else layer.named[name].numpy()
    plain.set_params(params)
    baked_ids = {id(t) for t, _ in weight_transforms}
    for transform, targets in net.attachments():
        if id(transform) in baked_ids or not transform.saved:
            continue
        new = plain.attach(type(transform).from_config(transform.config(), plain), targets)
        new.load_state(transform.state_arrays(), what=net.arch)
    return plain
