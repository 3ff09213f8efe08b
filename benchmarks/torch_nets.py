"""PyTorch (torch.nn) versions of the toolkit's CIFAR ResNet-20/-56 and MobileNetV2.

Benchmark-only: they let a CPU-speed benchmark run the *same* nets with the *same* weights in
PyTorch as in the toolkit (nets/resnet.py, nets/mobilenet.py). The layout follows the toolkit
exactly:

* ResNet: 3x3 stem conv to 16 channels - BN - ReLU; three stages of basic blocks (16/32/64
  channels, strides 1/2/2), conv1 (carries the stride) - BN - ReLU - conv2 - BN - add the
  shortcut - ReLU; a 1x1 conv + BN projection shortcut ("option B") where the stride or the
  width changes; global average pooling; a dense classifier with bias.
* MobileNetV2 (CIFAR): 3x3 stem conv to 32 channels, stride 1 - BN - ReLU6; seventeen inverted
  residual blocks with stage strides (1, 1, 2, 2, 1, 2, 1): expand 1x1 - BN - ReLU6 (absent
  when t = 1), depthwise 3x3 (carries the stride) - BN - ReLU6, project 1x1 - BN (linear),
  plus the input where the stride is 1 and the full widths agree; head 1x1 conv to 1280 - BN -
  ReLU6, average pooling, dense classifier.

Convs have no bias. Padding is TensorFlow's "SAME": stride-1 convs pad symmetrically (PyTorch's
own `padding=k // 2`), strided convs pad what SAME pads, which for a 3x3/2 conv on an even map
is 0 rows/columns at the top/left and 1 at the bottom/right (an `F.pad` before the conv; 1x1/2
convs need none). BN: epsilon 1e-5, torch momentum 0.1 (the toolkit's 0.9); PyTorch updates
the running variance with the unbiased batch variance, the toolkit with the biased one, which
only matters for the moving statistics in training mode. The nets take inputs already
normalised by the data pipeline (`dataloader.base.normalise`), as the toolkit's nets do: no
mean/std inside. Inputs are NCHW.

Params are the toolkit's dicts `{"scope/var:0": ndarray}` (`Net.get_params()`); channel widths
come from their kernel shapes, so slimmed nets are rebuilt at their widths. Without params the
torch net is initialised like the toolkit's (He fan-out truncated normal convs, N(0, 0.01)
classifier, zero gamma on the ResNet blocks' last BN).

Check against the toolkit (max |logit difference| in inference mode, about 1e-5)::

    PYTHONPATH=. python benchmarks/torch_nets.py
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Params = Mapping[str, np.ndarray]

_RESNET_DEPTHS, _RESNET_STRIDES = (16, 32, 64), (1, 2, 2)
# (expansion t, output channels c, blocks n) and the CIFAR stage strides of nets/mobilenet.py.
_MBV2_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
_MBV2_STRIDES = (1, 1, 2, 2, 1, 2, 1)
_MBV2_STEM, _MBV2_HEAD = 32, 1280


# === Layers: torch modules that know their toolkit scope ===
class Conv(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding; `depthwise` makes it a multiplier-1 depthwise conv."""

    def __init__(self, scope: str, cin: int, cout: int, kernel: int, stride: int = 1, depthwise: bool = False):
        # Stride 1 with an odd kernel: SAME is symmetric, PyTorch's own padding does it.
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0,
                         groups=cin if depthwise else 1, bias=False)
        self.scope, self.depthwise = scope, depthwise
        fan_out = kernel * kernel * (1 if depthwise else cout)  # the toolkit's fan for its init
        std = math.sqrt(2.0 / fan_out) / 0.87962566103423978
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads = _same_pads(x.shape[-1], x.shape[-2], self.kernel_size[0], self.stride[0])
            if any(pads):  # 3x3/2 on an even map: (0, 1, 0, 1); 1x1/2: none
                x = F.pad(x, pads)
        return super().forward(x)

    def load(self, params: Params) -> list[str]:
        kernel = np.asarray(params[f"{self.scope}/kernel:0"])
        # HWIO -> OIHW; a depthwise (H, W, C, 1) kernel -> (C, 1, H, W).
        _copy(self.weight, kernel.transpose(2, 3, 0, 1) if self.depthwise else kernel.transpose(3, 2, 0, 1))
        return [f"{self.scope}/kernel:0"]


class BatchNorm(nn.BatchNorm2d):
    """The toolkit's BatchNorm: epsilon 1e-5, moving statistics moving by 0.1 a step."""

    def __init__(self, scope: str, channels: int, gamma_zero: bool = False):
        super().__init__(channels, eps=1e-5, momentum=0.1)
        self.scope = scope
        if gamma_zero:
            nn.init.zeros_(self.weight)

    def load(self, params: Params) -> list[str]:
        names = {"gamma": self.weight, "beta": self.bias, "moving_mean": self.running_mean,
                 "moving_variance": self.running_var}
        for name, tensor in names.items():
            _copy(tensor, np.asarray(params[f"{self.scope}/{name}:0"]).reshape(-1))
        return [f"{self.scope}/{name}:0" for name in names]


class Dense(nn.Linear):
    """Classifier with bias; the toolkit's kernel is [in, out]."""

    def __init__(self, scope: str, cin: int, cout: int):
        super().__init__(cin, cout)
        self.scope = scope
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)

    def load(self, params: Params) -> list[str]:
        _copy(self.weight, np.asarray(params[f"{self.scope}/kernel:0"]).T)
        _copy(self.bias, np.asarray(params[f"{self.scope}/biases:0"]).reshape(-1))
        return [f"{self.scope}/kernel:0", f"{self.scope}/biases:0"]


def _same_pads(width: int, height: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """`(left, right, top, bottom)` of TF SAME padding: the odd row/column goes bottom/right."""
    def split(size):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    return (*split(width), *split(height))


def _copy(tensor: torch.Tensor, value: np.ndarray) -> None:
    if tuple(tensor.shape) != value.shape:
        raise ValueError(f"shape {value.shape} does not fit a torch tensor of shape {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(value, np.float32)))


class _Widths:
    """Channel counts of the toolkit's groups: a conv's output width read from its kernel in
    `params` when given, else `widths[group]` (the toolkit's width spec), else the full width."""

    def __init__(self, params: Params | None, widths: Mapping[str, int] | None):
        self.params, self.widths = params, dict(widths or {})

    def __call__(self, group: str, full: int, conv: str) -> int:
        if self.params is not None:
            return int(np.shape(self.params[f"{conv}/kernel:0"])[-1])
        return int(self.widths.get(group, full))


# === Nets ===
class BasicBlock(nn.Module):
    def __init__(self, scope: str, cin: int, inner: int, cout: int, stride: int, project: bool):
        super().__init__()
        self.conv1, self.bn1 = Conv(scope + "conv1", cin, inner, 3, stride), BatchNorm(scope + "bn1", inner)
        self.conv2 = Conv(scope + "conv2", inner, cout, 3)
        self.bn2 = BatchNorm(scope + "bn2", cout, gamma_zero=True)
        self.shortcut = nn.Sequential(Conv(scope + "conv3", cin, cout, 1, stride),
                                      BatchNorm(scope + "bn3", cout)) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with option-B shortcuts (nets/resnet.py)."""

    def __init__(self, blocks: int, width: _Widths, num_classes: int = 10):
        super().__init__()
        stream = width("stem", _RESNET_DEPTHS[0], "conv")
        self.conv, self.bn = Conv("conv", 3, stream, 3), BatchNorm("bn", stream)
        layers, in_depth = [], _RESNET_DEPTHS[0]  # full widths decide the structure, as in the toolkit
        for i, (depth, stride) in enumerate(zip(_RESNET_DEPTHS, _RESNET_STRIDES)):
            for j in range(blocks):
                scope, s = f"BasicBlock{i}.{j}/", stride if j == 0 else 1
                project = s > 1 or depth != in_depth
                out = width(f"stage{i}", depth, scope + "conv3") if project else stream
                inner = width(scope + "conv1", depth, scope + "conv1")
                layers.append(BasicBlock(scope, stream, inner, out, s, project))
                stream, in_depth = out, depth
        self.blocks = nn.Sequential(*layers)
        self.fc = Dense("fc", stream, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, scope: str, cin: int, inner: int, cout: int, stride: int, expand: bool, residual: bool):
        super().__init__()
        self.expand = nn.Sequential(Conv(scope + "expand", cin, inner, 1), BatchNorm(scope + "expand_bn", inner),
                                    nn.ReLU6()) if expand else nn.Identity()
        self.dw = Conv(scope + "dw", inner, inner, 3, stride, depthwise=True)
        self.dw_bn = BatchNorm(scope + "dw_bn", inner)
        self.project, self.project_bn = Conv(scope + "project", inner, cout, 1), BatchNorm(scope + "project_bn", cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.dw_bn(self.dw(self.expand(x))))
        y = self.project_bn(self.project(y))
        return x + y if self.residual else y  # linear bottleneck: no activation after the add


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2, width multiplier 1.0 (nets/mobilenet.py)."""

    def __init__(self, width: _Widths, strides=_MBV2_STRIDES, stem_stride: int = 1, num_classes: int = 10):
        super().__init__()
        stream = width("stem", _MBV2_STEM, "conv")
        self.conv, self.bn = Conv("conv", 3, stream, 3, stem_stride), BatchNorm("bn", stream)
        layers, in_depth, k = [], _MBV2_STEM, 0
        for i, ((t, depth, count), stride) in enumerate(zip(_MBV2_STAGES, strides)):
            for j in range(count):
                scope, s = f"block{k}/", stride if j == 0 else 1
                residual = s == 1 and in_depth == depth
                out = stream if residual else width(f"stage{i}", depth, scope + "project")
                inner = stream if t == 1 else width(scope + "expand", in_depth * t, scope + "expand")
                layers.append(InvertedResidual(scope, stream, inner, out, s, t != 1, residual))
                stream, in_depth, k = out, depth, k + 1
        self.blocks = nn.Sequential(*layers)
        head = width("head", _MBV2_HEAD, "head")
        self.head, self.head_bn = Conv("head", stream, head, 1), BatchNorm("head_bn", head)
        self.fc = Dense("fc", head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.bn(self.conv(x))))
        x = F.relu6(self.head_bn(self.head(x)))
        return self.fc(x.mean((2, 3)))


_ARCHS = {
    "resnet-20": lambda width, classes: ResNet(3, width, classes),
    "resnet-56": lambda width, classes: ResNet(9, width, classes),
    "mobilenetv2": lambda width, classes: MobileNetV2(width, num_classes=classes),
}


def build(arch: str, params: Params | None = None, widths: Mapping[str, int] | None = None) -> nn.Module:
    """The torch net of toolkit arch `arch` ("ResNet-20", "ResNet-56", "MobileNetV2"), in train mode.

    Args:
        arch: toolkit registry name (case-insensitive).
        params: toolkit params (`Net.get_params()`); the widths are read from their kernel shapes
            and the params are loaded. None: the toolkit's initialisation.
        widths: the toolkit's width spec (`Net.widths()` keys) for a net built without params;
            ignored when `params` is given.
    """
    make = _ARCHS.get(arch.lower())
    if make is None:
        raise ValueError(f"no torch version of {arch!r}; known: ResNet-20, ResNet-56, MobileNetV2")
    classes = int(np.shape(params["fc/kernel:0"])[1]) if params is not None else 10
    module = make(_Widths(params, widths), classes)
    if params is not None:
        load_params(module, params)
    return module


def load_params(module: nn.Module, params: Params) -> None:
    """Copy toolkit params into `module` (built for their widths); every param must be used once."""
    used = [key for layer in module.modules() if hasattr(layer, "scope") for key in layer.load(params)]
    unused = sorted(set(params) - set(used))
    if unused or len(used) != len(set(used)):
        raise ValueError(f"params do not match the torch net: unused {unused[:3]}")


# === Check against the toolkit ===
def _randomised(params: dict, rng: np.random.Generator) -> dict:
    """`params` with BN gammas, betas and statistics moved off their initial values (the
    ResNet blocks' zero gammas by as much as the others, so the residual stream stays moderate)."""
    out = dict(params)
    for key, value in params.items():
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if key.endswith("/gamma:0"):
            out[key] = value + 0.2 * noise
        elif key.endswith("/beta:0") or key.endswith("/moving_mean:0"):
            out[key] = 0.1 * noise
        elif key.endswith("/moving_variance:0"):
            out[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return out


def _check(arch: str, widths: dict | None, label: str, rng: np.random.Generator) -> None:
    import nets

    net = nets.build(arch, widths=widths, masked=False)
    params = _randomised(net.get_params(), rng)
    net.set_params(params)
    x = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    theirs = np.asarray(net(x, training=False))
    module = build(arch, params).eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    count = sum(p.numel() for p in module.parameters())
    diff, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
    print(f"{label}: max |logit diff| {diff:.2e} (max |logit| {scale:.3f}, relative {diff / scale:.1e}), "
          f"{count:,} torch params")


def main() -> None:
    import nets

    rng = np.random.default_rng(0)
    for arch in ("ResNet-20", "ResNet-56", "MobileNetV2"):
        _check(arch, None, arch, rng)
    full = nets.build("ResNet-56", masked=False).widths()
    slim = {key: max(1, round(0.6 * width)) for key, width in full.items()}
    _check("ResNet-56", slim, "ResNet-56 slimmed to 0.6 of every group", rng)


if __name__ == "__main__":
    main()
