"""`--method ws`: weight sparsification with Zhu and Gupta's schedule (PocketFlow's `weight-sparse`).

Every conv, depthwise conv and dense kernel gets a magnitude mask (`nets.sparsity.MagnitudeMask`).
During training the target sparsity of step t is

    s_t = s_f - s_f * (1 - (t - t_b) / (t_e - t_b))^alpha,  t clipped to [t_b, t_e],

and every `--ws_update_every` steps inside [t_b, t_e] (and at t_e, where s_t = s_f) each layer's
mask keeps the largest-magnitude entries of its stored kernel at the layer's share of s_t. The
stored kernel is PocketFlow's backup: pruned entries get no update of any kind (their gradient
and weight decay are masked, `Sparsify.update_mask`), so thresholds come from the backup values
(PocketFlow's PR #134), and the optimizer's slots are reset at each update.

Per-layer sparsities (`--ws_protocol`): `uniform` (every layer at s_t), `heurist` (proportional
to the log of the layer's parameter count, scaled so the parameter-weighted mean is s_t), `list`
(`--ws_ratio_file`: a JSON object `{"<layer key>": sparsity}` naming every masked layer, scaled
by s_t / s_f during the ramp; the policy search writes it).

The step starts from the trained net (`--trained_param`, the previous step's output, or the
baseline the run trains first) unless `--ws_from_scratch`; its output stores the pruned weights
as zeros and keeps the masks, so a later step (`ws,uq`) stays sparse. `sparsity.json` lists each
layer's sparsity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np

from codebase import stages
from codebase.methods.base import Method, Stage, register
from codebase.options import Options, fraction, json_object, option, positive
from nets.layers import FC, Conv2d, DepthwiseConv2d
from nets.sparsity import MagnitudeMask
from op_utils.task import Classify
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

PROTOCOLS = ("uniform", "heurist", "list")
SPARSITY = "sparsity.json"


@dataclasses.dataclass(frozen=True)
class WSOptions(Options):
    """Weight sparsification's options (PocketFlow's defaults)."""

    ws_sparsity: float = option(0.75, "final sparsity s_f: the parameter-weighted fraction of kernel weights set "
                                      "to zero")
    ws_exponent: float = option(3.0, "exponent alpha of the schedule")
    ws_begin: float = option(0.1, "t_b, the start of the ramp, as a fraction of the step's training")
    ws_end: float = option(0.5, "t_e, the end of the ramp, as a fraction of the step's training")
    ws_update_every: int = option(500, "optimizer steps between mask updates inside the ramp")
    ws_protocol: str = option("uniform", "per-layer sparsities: uniform, heurist (proportional to log #params) or "
                                         "list (--ws_ratio_file)", choices=PROTOCOLS)
    ws_ratio_file: Optional[str] = option(None, "JSON {layer key: sparsity} for --ws_protocol list")
    ws_from_scratch: bool = option(False, "train from a random initialisation (PocketFlow's behaviour) instead of "
                                          "from the trained net")

    def validate(self, **context) -> None:
        super().validate(**context)
        fraction("ws_sparsity", self.ws_sparsity, low_open=False)
        positive(ws_exponent=self.ws_exponent, ws_update_every=self.ws_update_every)
        fraction("ws_begin", self.ws_begin, low_open=False)
        fraction("ws_end", self.ws_end, high_open=False)
        if not self.ws_begin < self.ws_end:
            raise ConfigError(f"--ws_begin {self.ws_begin} must be before --ws_end {self.ws_end}")
        if (self.ws_protocol == "list") != (self.ws_ratio_file is not None):
            raise ConfigError("--ws_ratio_file goes with --ws_protocol list, and list needs it")
        if self.ws_ratio_file is not None and not os.path.isfile(self.ws_ratio_file):
            raise ConfigError(f"--ws_ratio_file {self.ws_ratio_file} does not exist")


def schedule(step: int, total: int, final: float, exponent: float, begin: float, end: float) -> float:
    """Zhu and Gupta's s_t at optimizer step `step` of `total`."""
    t_b, t_e = begin * total, end * total
    if t_e <= t_b:
        return final if step >= t_e else 0.0
    t = min(max(step, t_b), t_e)
    return final - final * (1.0 - (t - t_b) / (t_e - t_b)) ** exponent


def update_steps(total: int, every: int, begin: float, end: float) -> list:
    """The steps (1-based) after which masks are updated: every `every` from t_b, and t_e."""
    t_b, t_e = max(1, math.ceil(begin * total)), max(1, math.floor(end * total))
    return sorted(set(range(t_b, t_e + 1, every)) | {t_e})


def maskable(net) -> dict:
    """`{layer key: layer}` of every conv, depthwise conv and dense layer, in order."""
    return {k: layer for k, layer in net.layers.items() if isinstance(layer, (Conv2d, DepthwiseConv2d, FC))}


def layer_sparsities(net, protocol: str, final: float, ratio_file: str | None = None) -> dict:
    """Each maskable layer's final sparsity under `protocol` (see the module docstring)."""
    layers = maskable(net)
    sizes = {k: int(np.prod(layer.kernel.shape)) for k, layer in layers.items()}
    if protocol == "uniform":
        return dict.fromkeys(layers, final)
    if protocol == "heurist":
        weights = {k: math.log(n) for k, n in sizes.items()}
        scale = final * sum(sizes.values()) / sum(sizes[k] * weights[k] for k in layers)
        ratios = {k: scale * weights[k] for k in layers}
        too_high = [k for k, r in ratios.items() if r >= 1.0]
        if too_high:
            raise ConfigError(f"--ws_protocol heurist at --ws_sparsity {final} would prune all of {too_high[0]}")
        return ratios
    if protocol == "list":
        ratios = json_object(ratio_file, "ws_ratio_file", "{layer key: sparsity}")
        missing, unknown = sorted(set(layers) - set(ratios)), sorted(set(ratios) - set(layers))
        if missing or unknown:
            raise ConfigError(f"--ws_ratio_file {ratio_file}: " + (f"no sparsity for layer {missing[0]!r}" if missing
                                                                   else f"{unknown[0]!r} is not a masked layer"))
        for key, value in ratios.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"--ws_ratio_file {ratio_file}: sparsity of {key} must be in [0, 1), got {value!r}")
        return {k: float(ratios[k]) for k in layers}
    raise ConfigError(f"unknown --ws_protocol {protocol!r}")


def attach_masks(net) -> dict:
    """A `MagnitudeMask` on every maskable kernel (call in the strategy scope): `{layer key: mask}`."""
    return {k: net.attach(MagnitudeMask(), [f"{k}/kernel"]) for k in maskable(net)}


class Sparsify(Classify):
    """Cross-entropy training of `net` whose masks follow the schedule.

    Args:
        net: the net, with `attach_masks` done.
        masks: `{layer key: MagnitudeMask}`.
        ratios: `{layer key: final sparsity}`.
        total: optimizer steps of the training.
        opts: the `WSOptions`.
    """

    def __init__(self, net, masks: dict, ratios: dict, total: int, opts: WSOptions):
        super().__init__(net)
        self.masks, self.ratios, self.total, self.opts = masks, ratios, int(total), opts
        self._by_var = {net.layers[k].kernel.ref(): m.mask for k, m in masks.items()}
        self._updates = set(update_steps(total, opts.ws_update_every, opts.ws_begin, opts.ws_end))

    def update_mask(self, var):
        return self._by_var.get(var.ref())

    def target(self, step: int) -> float:
        o = self.opts
        return schedule(step, self.total, o.ws_sparsity, o.ws_exponent, o.ws_begin, o.ws_end)

    def after_step(self, step):
        if step not in self._updates:
            return False
        self.update(self.target(step))
        return True

    def update(self, sparsity: float) -> None:
        """Every mask at its layer's share of the overall `sparsity`, from the stored (backup) kernels."""
        share = sparsity / self.opts.ws_sparsity if self.opts.ws_sparsity > 0 else 0.0
        for key, mask in self.masks.items():
            mask.keep_largest(self.model.layers[key].kernel.numpy(), min(self.ratios[key] * share, 1.0 - 1e-9))


def sparsity_report(net, masks: dict) -> dict:
    sizes = {k: int(np.prod(m.mask.shape)) for k, m in masks.items()}
    per_layer = {k: m.sparsity() for k, m in masks.items()}
    total = sum(sizes.values())
    return {"sparsity": sum(per_layer[k] * sizes[k] for k in masks) / max(total, 1), "masked_weights": total,
            "layers": per_layer}


@register("ws")
class WeightSparsification(Method):
    Options = WSOptions
    needs_trained = True
    trains = True

    @classmethod
    def from_scratch(cls, options) -> bool:
        return options.ws_from_scratch

    def stages(self):
        return [Stage("train", self.train), Stage("test", self.test)]

    def train(self):
        step, opts, ctx = self.step, self.options, self.ctx
        net = step.start_net() if not opts.ws_from_scratch else ctx.build_net()
        with ctx.strategy.scope():
            masks = attach_masks(net)
        ratios = layer_sparsities(net, opts.ws_protocol, opts.ws_sparsity, opts.ws_ratio_file)
        total = step.optim.train_epoch * ctx.steps_per_epoch(step.optim)
        task = Sparsify(net, masks, ratios, total, opts)
        log.info("ws: %s to sparsity %.3f (%s), mask updates at %d steps of %d", ctx.describe(net), opts.ws_sparsity,
                 opts.ws_protocol, len(task._updates), total)
        step.train(task, "train", on_step_end=lambda s: {"sparsity": task.target(s)})
        for key, mask in masks.items():  # the output stores the pruned weights as zeros
            kernel = net.layers[key].kernel
            kernel.assign(kernel * mask.mask)
        atomic_write_json(step.path(SPARSITY), sparsity_report(net, masks))
        step.save(net)

    def test(self):
        results = stages.test(self.step)
        with open(self.step.path(SPARSITY), encoding="utf-8") as f:
            report = json.load(f)
        atomic_write_json(self.step.path(stages.RESULTS), {**results, "sparsity": report["sparsity"]})
        log.info("ws: sparsity %.4f of %d kernel weights, top1 %.4f", report["sparsity"], report["masked_weights"],
                 results["top1"])
