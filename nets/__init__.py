"""Networks built from masked `tcl`-style layers; importing this package registers them."""

from nets import resnet  # noqa: F401  (registers the ResNets)
from nets import resnet_a  # noqa: F401  (registers the option-A ResNets: ResNet-20A/32A/44A/56A)
from nets import mobilenet  # noqa: F401  (registers MobileNetV2, MobileNetV2-ImageNet)
from nets import mobilenet_v3  # noqa: F401  (registers MobileNetV3-Small/-Large and their -ImageNet variants)
from nets import vgg  # noqa: F401  (registers VGG-16)
from nets import lenet  # noqa: F401  (registers LeNet-5)
from nets import mlp  # noqa: F401  (registers MLP)
from nets import quantizers, sparsity  # noqa: F401  (register the saved transform kinds a spec may name)
from nets.registry import build, build_from_params, build_from_spec, list_archs, lookup
from nets.slim import pad_channels, slim

__all__ = ["build", "build_from_params", "build_from_spec", "list_archs", "lookup", "pad_channels", "slim"]
