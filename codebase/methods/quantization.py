"""`--method uq` and `--method nuq`: quantization-aware training (PocketFlow's `uniform` and
`non-uniform` learners) with fake quantizers from `nets.quantizers`.

Both attach a weight quantizer to every conv, depthwise conv and dense kernel except the first
layer (the one reading the image) and the classifier, unless `--uq_all_layers` /
`--nuq_all_layers`, and an activation quantizer to every activation site that follows a ReLU
(`nets.sites`: every `group` and `block` site not marked linear) unless the activation bits are
32 (full precision, PocketFlow's default). They then train with PocketFlow's Adam schedule
(learning rate 1e-4, x0.1 at a quarter and two thirds of 60 epochs: its epochs 15 and 40) and
test the quantized net, whose evaluation uses the activations' moving ranges.

BatchNorm is not folded into the kernels during training, as in PocketFlow's learners: the
quantized kernel feeds a float BatchNorm. Folding for QAT (Jacob et al.) would need a second
convolution per layer in training to get the batch statistics; the deployment files compute
exactly what the quantized net's evaluation computes anyway, because they hold the quantized
kernels themselves (`nets.deploy.baked`; the BN is folded into them at inference by TensorFlow
or the TFLite converter, an affine map that the float file applies as the TF graph does).

`nuq` trains, by `--nuq_opt`, the weights (default), the centres only, or both; centres get no
weight decay. The step's output keeps its quantizers (spec and state), and `packed.npz` beside
it stores the integer codes bit-packed (`codebase.packed`), with its size next to the float
pickle's.

Per-layer bit widths: `--uq_bits_file` / `--nuq_bits_file` is a JSON object `{layer key: bits}`
naming every quantized layer (the policy search, `--method rl_uq` / `rl_nuq`, writes it); the
weight-bits flag is then unused by the quantizers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from codebase import packed, stages
from codebase.methods.base import Method, Stage, register
from codebase.options import Options, json_object, option
from nets.layers import FC, Conv2d, DepthwiseConv2d
from nets.quantizers import BUCKETS, ActivationQuantizer, NonUniformQuantizer, UniformQuantizer, check_bits, \
    check_buckets
from op_utils.task import Classify
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

FULL_PRECISION = 32
PACKED = "packed.npz"


def _check_activation_bits(flag: str, bits: int) -> None:
    if bits != FULL_PRECISION:
        try:
            check_bits(flag, bits)
        except ConfigError:
            raise ConfigError(f"--{flag} must be an integer in [1, 16], or 32 for full precision; got {bits!r}") \
                from None


def _check_file(flag: str, path) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"--{flag} {path} does not exist")


def layer_bits(keys, bits: int, bits_file: str | None, flag: str, max_bits: int = 16) -> dict:
    """`{layer key: weight bits}` of the quantized layers `keys`: `bits` for each, or the file's."""
    if bits_file is None:
        return dict.fromkeys(keys, int(bits))
    table = json_object(bits_file, flag, "{layer key: bits}")
    missing, unknown = [k for k in keys if k not in table], sorted(set(table) - set(keys))
    if missing or unknown:
        raise ConfigError(f"--{flag} {bits_file} names {len(table)} layers, {len(keys)} are quantized: "
                          + (f"no bits for {missing[0]!r}" if missing else f"{unknown[0]!r} is not one of them"))
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_bits:
            raise ConfigError(f"--{flag} {bits_file}: the bits of {key} must be an integer in [1, {max_bits}], "
                              f"got {value!r}")
    return {k: int(table[k]) for k in keys}


@dataclasses.dataclass(frozen=True)
class UQOptions(Options):
    """Uniform quantization's options (PocketFlow's defaults)."""

    uq_weight_bits: int = option(4, "bits of the weights, in [1, 16]")
    uq_activation_bits: int = option(32, "bits of the activations after each ReLU, in [1, 16]; 32 = full precision")
    uq_buckets: str = option("none", "weight ranges per tensor (none), per output channel (channel), or per split "
                                     "bucket of --uq_bucket_size strided values (split)", choices=BUCKETS)
    uq_bucket_size: int = option(256, "values per split bucket")
    uq_all_layers: bool = option(False, "quantize the first layer and the classifier too")
    uq_bits_file: Optional[str] = option(None, "JSON {layer key: bits} of every quantized layer (per-layer bit "
                                               "widths, as the policy search writes them)")

    def validate(self, **context) -> None:
        super().validate(**context)
        check_bits("uq_weight_bits", self.uq_weight_bits)
        _check_file("uq_bits_file", self.uq_bits_file)
        _check_activation_bits("uq_activation_bits", self.uq_activation_bits)
        check_buckets("uq_bucket_size", self.uq_buckets, self.uq_bucket_size)


@dataclasses.dataclass(frozen=True)
class NUQOptions(Options):
    """Non-uniform quantization's options (PocketFlow's defaults)."""

    nuq_weight_bits: int = option(4, "bits of the weights (2^bits centres per bucket), in [1, 8]")
    nuq_activation_bits: int = option(32, "bits of the activations after each ReLU, in [1, 16]; 32 = full "
                                          "precision")
    nuq_buckets: str = option("none", "centres per tensor (none), per output channel (channel), or per split bucket "
                                      "of --nuq_bucket_size strided values (split)", choices=BUCKETS)
    nuq_bucket_size: int = option(256, "values per split bucket")
    nuq_init: str = option("quantile", "initial centres: quantile or uniform", choices=("quantile", "uniform"))
    nuq_opt: str = option("weights", "what trains: weights (centres fixed), centres (weights fixed) or both",
                          choices=("weights", "centres", "both"))
    nuq_all_layers: bool = option(False, "quantize the first layer and the classifier too")
    nuq_bits_file: Optional[str] = option(None, "JSON {layer key: bits} of every quantized layer (per-layer bit "
                                                "widths in [1, 8], as the policy search writes them)")

    def validate(self, **context) -> None:
        super().validate(**context)
        _check_file("nuq_bits_file", self.nuq_bits_file)
        check_bits("nuq_weight_bits", self.nuq_weight_bits)
        if self.nuq_weight_bits > 8:
            raise ConfigError(f"--nuq_weight_bits must be in [1, 8] (2^bits centres per bucket), got "
                              f"{self.nuq_weight_bits}")
        _check_activation_bits("nuq_activation_bits", self.nuq_activation_bits)
        check_buckets("nuq_bucket_size", self.nuq_buckets, self.nuq_bucket_size)


def quantized_layers(net, all_layers: bool) -> list:
    """Keys of the layers whose kernels are quantized: every conv and dense layer but the one
    reading the image and the classifier, unless `all_layers`."""
    keys = []
    for key, layer in net.layers.items():
        if not isinstance(layer, (Conv2d, DepthwiseConv2d, FC)):
            continue
        groups = layer.groups()
        edge = groups[0] is net.groups.get("input") or groups[-1] is net.groups.get("logits")
        if all_layers or not edge:
            keys.append(key)
    return keys


def equivalent_bits(net, bits: dict) -> float:
    """The parameter-weighted mean of the layers' weight bits (`{layer key: bits}`)."""
    sizes = {k: int(np.prod(net.layers[k].kernel.shape)) for k in bits}
    return sum(bits[k] * sizes[k] for k in bits) / max(sum(sizes.values()), 1)


def activation_sites(net) -> list:
    """Names of the sites after a ReLU: every group and block site not marked linear."""
    return [name for name, site in net.final_sites().items() if not site.linear]


def attach_quantizers(net, make_weight_quantizer, weight_layers, activation_bits: int) -> dict:
    """Attach quantizers (in the strategy scope): `make_weight_quantizer(layer key)` for each of
    `weight_layers`; returns `{"weights": [...], "activations": [...]}`."""
    weights = [net.attach(make_weight_quantizer(key), [f"{key}/kernel"]) for key in weight_layers]
    activations = []
    if activation_bits != FULL_PRECISION:
        activations = [net.attach(ActivationQuantizer(net.state, activation_bits), [name])
                       for name in activation_sites(net)]
    return {"weights": weights, "activations": activations}


class _Quantize(Method):
    """Attach quantizers -> train (quantization-aware) -> test, pack."""

    needs_trained = True
    trains = True

    @classmethod
    def optim_defaults(cls, dataset):
        if str(dataset).lower() == "imagenet":
            return dict(optimizer="adam", learning_rate=1e-4, schedule="step", decay_points=(0.1, 0.4),
                        decay_rate=0.1, weight_decay=1e-4, train_epoch=50)
        return dict(optimizer="adam", learning_rate=1e-4, schedule="step", decay_points=(0.25, 2 / 3),
                    decay_rate=0.1, weight_decay=2e-4, train_epoch=60)

    def stages(self):
        return [Stage("train", self.train), Stage("test", self.test)]

    def weight_quantizer(self, bits: int):
        raise NotImplementedError

    def bits(self, keys) -> dict:
        """`{layer key: weight bits}` (the bits flag, or the bits file)."""
        raise NotImplementedError

    def settings(self) -> tuple:
        """`(all_layers, activation_bits)`."""
        raise NotImplementedError

    def task(self, net, quantizers):
        return Classify(net)

    def train(self):
        step, ctx = self.step, self.ctx
        net = step.start_net()
        all_layers, activation_bits = self.settings()
        keys = quantized_layers(net, all_layers)
        bits = self.bits(keys)
        with ctx.strategy.scope():
            quantizers = attach_quantizers(net, lambda key: self.weight_quantizer(bits[key]), keys, activation_bits)
        before = ctx.evaluate(net)
        log.info("%s: %d kernels and %d activation sites quantized, top1 %.4f before training | %s", self.name,
                 len(quantizers["weights"]), len(quantizers["activations"]), before["top1"], ctx.describe(net))
        atomic_write_json(step.path("quantized.json"), {"before_training_top1": float(before["top1"]),
                                                         "weight_kernels": len(quantizers["weights"]),
                                                         "activation_sites": len(quantizers["activations"]),
                                                         "bits": bits, "equivalent_bits": equivalent_bits(net, bits)})
        step.train(self.task(net, quantizers), "train")
        step.save(net)

    def test(self):
        results = stages.test(self.step)
        net = self.ctx.load_net(self.step.output)
        sizes = packed.save_packed(net, self.step.path(PACKED))
        atomic_write_json(self.step.path(stages.RESULTS), {**results, **sizes})
        log.info("%s: packed %s: %d bytes (float pickle %d bytes, %.2fx smaller)", self.name, PACKED,
                 sizes["packed_bytes"], sizes["float_bytes"], sizes["float_bytes"] / max(sizes["packed_bytes"], 1))


@register("uq")
class UniformQuantization(_Quantize):
    Options = UQOptions

    def weight_quantizer(self, bits):
        o = self.options
        return UniformQuantizer(bits, o.uq_buckets, o.uq_bucket_size)

    def bits(self, keys):
        return layer_bits(keys, self.options.uq_weight_bits, self.options.uq_bits_file, "uq_bits_file")

    def settings(self):
        return self.options.uq_all_layers, self.options.uq_activation_bits


@register("nuq")
class NonUniformQuantization(_Quantize):
    Options = NUQOptions

    def weight_quantizer(self, bits):
        o = self.options
        return NonUniformQuantizer(bits, o.nuq_buckets, o.nuq_bucket_size, o.nuq_init)

    def bits(self, keys):
        return layer_bits(keys, self.options.nuq_weight_bits, self.options.nuq_bits_file, "nuq_bits_file", max_bits=8)

    def settings(self):
        return self.options.nuq_all_layers, self.options.nuq_activation_bits

    def task(self, net, quantizers):
        return nuq_task(net, quantizers, self.options.nuq_opt)


def nuq_task(net, quantizers, opt: str) -> Classify:
    """Cross-entropy training of the variables `--nuq_opt` names: `weights` (every trainable
    variable but the centres), `centres`, or `both`; centres get no weight decay."""
    centres = [q.centres for q in quantizers["weights"]]
    ids = {id(c) for c in centres}
    others = [v for v in net.trainable_variables if id(v) not in ids]
    try:
        chosen = {"weights": others, "centres": centres, "both": others + centres}[opt]
    except KeyError:
        raise ConfigError(f"--nuq_opt must be weights, centres or both, got {opt!r}") from None
    return Classify(net, variables=chosen, overrides=lambda var: {"weight_decay": 0.0} if id(var) in ids else None)
