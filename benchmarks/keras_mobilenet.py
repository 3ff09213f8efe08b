"""The toolkit's CIFAR MobileNetV2 (nets/mobilenet.py) rebuilt as a plain Keras 3 functional model.

The ``model.fit`` baseline for MobileNetV2, as ``benchmarks/keras_resnet.py`` is for the
ResNets, so the layout follows ``nets.mobilenet.MobileNetV2`` (CIFAR variant) exactly:

* stem: 3x3 conv to 32 channels with stride 1, BN, ReLU6;
* seventeen inverted residual blocks in seven stages (t, c, n) = (1,16,1), (6,24,2),
  (6,32,3), (6,64,4), (6,96,3), (6,160,3), (6,320,1) with first-block strides
  (1, 1, 2, 2, 1, 2, 1); a block is expand 1x1 conv - BN - ReLU6 (absent when t = 1),
  depthwise 3x3 conv (carries the stride) - BN - ReLU6, project 1x1 conv - BN (linear), plus
  the block's input when the stride is 1 and the input and output widths are equal;
* head: 1x1 conv to 1280 channels, BN, ReLU6, global average pooling and a Dense classifier
  with bias.

Convs have no bias and "same" padding; BN uses momentum 0.9 and epsilon 1e-5 like the
toolkit's BatchNorm; initialisers match the toolkit's (He fan-out truncated normal for convs,
which for a depthwise kernel is the toolkit's sqrt(2 / 9) fan; N(0, 0.01) for the classifier
kernel). MobileNetV2 has 2,236,682 trainable parameters in both versions.

Check the parameter count against the toolkit with::

    python benchmarks/keras_mobilenet.py
"""

from __future__ import annotations

import argparse
import os
import sys

from keras_resnet import _bn, _conv, compare_counts

# (expansion t, output channels c, blocks n) and the CIFAR strides of nets/mobilenet.py.
_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
_CIFAR_STRIDES = (1, 1, 2, 2, 1, 2, 1)
_STEM, _HEAD = 32, 1280


def _dwconv(keras, stride: int, name: str):
    # Keras's fan-out of a (3, 3, C, 1) depthwise kernel is 3 * 3 * 1: the toolkit's fan.
    return keras.layers.DepthwiseConv2D(
        3, strides=stride, padding="same", use_bias=False, name=name,
        depthwise_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal"),
    )


def cifar_mobilenet_v2(num_classes: int = 10, input_size: int = 32):
    """The CIFAR MobileNetV2 (width multiplier 1.0) as a ``keras.Model`` returning logits.

    Args:
        num_classes: Width of the classifier.
        input_size: Height and width of the (square, 3-channel) input.

    Returns:
        An unbuilt-optimizer functional ``keras.Model``; build it inside a strategy's
        scope to distribute it.
    """
    import keras

    def relu6(name: str):
        return keras.layers.ReLU(max_value=6.0, name=name)

    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = relu6("relu6")(_bn(keras, "bn")(_conv(keras, _STEM, 3, 1, "conv")(inputs)))
    in_depth, k = _STEM, 0
    for (t, depth, count), stride in zip(_STAGES, _CIFAR_STRIDES):
        for j in range(count):
            name = f"block{k}_"
            s = stride if j == 0 else 1
            y = x
            if t != 1:
                y = _conv(keras, in_depth * t, 1, 1, name + "expand")(y)
                y = relu6(name + "expand_relu6")(_bn(keras, name + "expand_bn")(y))
            y = _dwconv(keras, s, name + "dw")(y)
            y = relu6(name + "dw_relu6")(_bn(keras, name + "dw_bn")(y))
            y = _conv(keras, depth, 1, 1, name + "project")(y)
            y = _bn(keras, name + "project_bn")(y)
            # Linear bottleneck: no activation after the add.
            x = keras.layers.Add(name=name + "add")([x, y]) if s == 1 and in_depth == depth else y
            in_depth, k = depth, k + 1
    x = _conv(keras, _HEAD, 1, 1, "head")(x)
    x = relu6("head_relu6")(_bn(keras, "head_bn")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logits = keras.layers.Dense(
        num_classes, name="fc",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
    )(x)
    return keras.Model(inputs, logits, name="keras_mobilenet_v2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nets

    return compare_counts(cifar_mobilenet_v2(), nets.build("MobileNetV2", masked=False))


if __name__ == "__main__":
    sys.exit(main())
