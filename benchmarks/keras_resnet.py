"""The toolkit's CIFAR ResNet (nets/resnet.py) rebuilt as a plain Keras 3 functional model.

Used by ``benchmarks/train_throughput.py`` as the ``model.fit`` baseline, so the layout
follows ``nets.resnet.ResNet`` exactly:

* stem: 3x3 conv to 16 channels, BN, ReLU;
* three stages of ``n`` basic blocks with 16/32/64 channels and strides 1/2/2; a block is
  conv1 (carries the stride) - BN - ReLU - conv2 - BN (gamma initialised to 0) - add the
  shortcut - ReLU;
* the shortcut is a 1x1 conv + BN projection ("option B") when the stride or the width
  changes, else the identity;
* global average pooling and a Dense classifier with bias.

Convs have no bias; BN uses momentum 0.9 and epsilon 1e-5 like the toolkit's BatchNorm;
initialisers match the toolkit's (He fan-out truncated normal for convs, N(0, 0.01) for
the classifier kernel). ResNet-56 has 855,770 trainable parameters in both versions.

Check the parameter count against the toolkit with::

    python benchmarks/keras_resnet.py            # ResNet-56
    python benchmarks/keras_resnet.py --depth 20
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

_CIFAR_DEPTHS = (16, 32, 64)
_CIFAR_STRIDES = (1, 2, 2)


def _conv(keras, filters: int, kernel: int, stride: int, name: str):
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=name,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal"),
    )


def _bn(keras, name: str, gamma_zero: bool = False):
    return keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, name=name,
        gamma_initializer="zeros" if gamma_zero else "ones",
    )


def cifar_resnet(depth: int = 56, num_classes: int = 10, input_size: int = 32):
    """A CIFAR ResNet-``depth`` (20, 32, 56, 110, ...) as a ``keras.Model`` returning logits.

    Args:
        depth: 6 n + 2 layers; ``n`` basic blocks per stage.
        num_classes: Width of the classifier.
        input_size: Height and width of the (square, 3-channel) input.

    Returns:
        An unbuilt-optimizer functional ``keras.Model``; build it inside a strategy's
        scope to distribute it.
    """
    import keras

    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = _conv(keras, _CIFAR_DEPTHS[0], 3, 1, "conv")(inputs)
    x = keras.layers.ReLU(name="relu")(_bn(keras, "bn")(x))
    in_depth = _CIFAR_DEPTHS[0]
    for i, (depth_i, stride) in enumerate(zip(_CIFAR_DEPTHS, _CIFAR_STRIDES)):
        for j in range(blocks):
            name = f"BasicBlock{i}.{j}_"
            s = stride if j == 0 else 1
            if s > 1 or depth_i != in_depth:
                shortcut = _conv(keras, depth_i, 1, s, name + "conv3")(x)
                shortcut = _bn(keras, name + "bn3")(shortcut)
            else:
                shortcut = x
            y = _conv(keras, depth_i, 3, s, name + "conv1")(x)
            y = keras.layers.ReLU(name=name + "relu1")(_bn(keras, name + "bn1")(y))
            y = _conv(keras, depth_i, 3, 1, name + "conv2")(y)
            y = _bn(keras, name + "bn2", gamma_zero=True)(y)
            x = keras.layers.Add(name=name + "add")([y, shortcut])
            x = keras.layers.ReLU(name=name + "relu2")(x)
            in_depth = depth_i
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logits = keras.layers.Dense(
        num_classes, name="fc",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
    )(x)
    return keras.Model(inputs, logits, name=f"keras_resnet{depth}")


def trainable_count(variables) -> int:
    """Sum of the sizes of ``variables`` (conv/dense kernels, biases, BN gamma and beta)."""
    return int(sum(np.prod(v.shape) for v in variables))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nets

    return compare_counts(cifar_resnet(args.depth), nets.build(f"ResNet-{args.depth}", masked=False))


def compare_counts(model, net) -> int:
    """Print the trainable parameter counts of a Keras `model` and the toolkit's `net`; 0 if equal."""
    ours = trainable_count(model.trainable_weights)
    theirs = trainable_count(net.trainable_variables)
    print(f"keras {net.arch}: {ours:,} trainable params ({len(model.trainable_weights)} variables)")
    print(f"toolkit {net.arch}: {theirs:,} trainable params ({len(net.trainable_variables)} variables)")
    if ours != theirs:
        print("MISMATCH")
        return 1
    print("match")
    return 0

if __name__ == "__main__":
    sys.exit(main())
