"""ResRep compactors (Ding et al., ICCV 2021) and their folding into an ordinary net.

A compactor is a 1x1 convolution C -> C without bias, initialised to the identity, that
follows the BatchNorm of every layer writing into a channel group (`Net.add_compactors`): an
output transform of those BatchNorms (`nets.transforms`). A residual stream has ONE
compactor, applied after every BN writing into it, so each write becomes `Q . BN(conv(x))`: a
zero row `c` of `Q` zeroes stream channel `c` everywhere, and the channel can be removed. The
compactor's `mask` (1 = open row) is not a forward mask: it only gates the task gradient of
`Q`'s rows during ResRep training.

Its kernel and mask are transform state: saved beside the params (`<params>.state.npz`), not in
the EKG params dict, and listed in the net's spec, so a net saved while training with
compactors rebuilds from its files.

`fold(net)` turns a net with compactors into a plain masked net of the same architecture:
each conv + BN + compactor becomes one conv followed by a BN that adds the folded bias, and
the group masks close the rows whose compactor mask is 0. `nets.slim` of it is the
deployable net, an ordinary registered net with its width spec.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets import axes as ax
from nets.transforms import Transform, register_transform

_EPS = 1e-12


@register_transform
class Compactor(Transform):
    """The compactor of one channel group.

    Args:
        group: the ChannelGroup it mixes (input and output).

    `kernel` is a `[1, 1, C, C]` HWIO kernel: output channel (row) `c` of the compactor is
    `kernel[0, 0, :, c]`. `mask` (`[C]`, not trainable) marks the open rows.
    """

    kind = "compactor"

    def __init__(self, group):
        super().__init__(name="compactor")
        self.group = group
        self.kernel = tf.Variable(np.eye(group.size, dtype=np.float32)[None, None], name="kernel")
        self.mask = tf.Variable(np.ones([group.size], np.float32), trainable=False, name="mask")

    def __call__(self, x):
        return tf.nn.conv2d(x, self.kernel, 1, "VALID")

    def state(self):
        return {"kernel": self.kernel, "mask": self.mask}

    def state_axes(self):
        return {"kernel": (ax.Axis(2, self.group), ax.Axis(3, self.group)), "mask": (ax.Axis(0, self.group),)}

    def config(self):
        return {"group": self.group.key}

    @classmethod
    def from_config(cls, config, net):
        return cls(net.groups[config["group"]])

    def row_norms(self) -> np.ndarray:
        """The L2 norm of every row (output channel), as numpy."""
        return np.linalg.norm(self.kernel.numpy().reshape([-1, self.group.size]), axis=0)

    def res_gradient(self, grad, strength: float):
        """ResRep's update direction for the kernel: `m * dL/dQ + strength * Q_row / |Q_row|`.

        The mask stops the task gradient of closed rows; the group-lasso term acts on every
        row, so closed rows decay towards zero.
        """
        kernel = tf.convert_to_tensor(self.kernel)
        norms = tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=[0, 1, 2], keepdims=True))
        return grad * self.mask + strength * kernel / tf.maximum(norms, _EPS)


def fold(net):
    """A plain masked net computing what `net` computes with its closed compactor rows zeroed.

    For a BN with a compactor `Q` (kernel `K`, `K[j, c]` mixing channel `j` into row `c`) after
    conv `W`, with `D = gamma / sqrt(var + eps)`: the conv becomes `W' = W (D K)` and its BN gets
    moving mean `m = mean (D K)`, beta `beta K` and gamma `sqrt(v + eps)`, so that in inference
    mode it adds exactly `beta K - m`, the folded bias. `v = var (D K)^2` is the variance of the
    new conv's output when channels are uncorrelated (exact for a diagonal `Q`); it only matters
    in training mode (fine-tuning), where the BN normalises with batch statistics.

    Group masks of the result are the compactor masks; `nets.slim` of it removes those rows.
    Other transforms of `net` are not carried over (ResRep nets have none).
    """
    compactors = net.compactors
    plain = type(net)(arch=net.arch, widths=net.widths(), masked=True, **net.config)
    params = net.get_params()
    for conv, bn in net.compacted_pairs():
        compactor = compactors[bn.group.key]
        kernel = compactor.kernel.numpy()[0, 0]
        gamma, beta, mean, var = (bn.named[n].numpy().reshape([-1]) for n in
                                  ("gamma", "beta", "moving_mean", "moving_variance"))
        mix = (gamma / np.sqrt(var + bn.epsilon))[:, None] * kernel  # D K
        weights = conv.kernel.numpy()
        params[f"{conv.key}/kernel:0"] = (weights.reshape([-1, weights.shape[-1]]) @ mix).reshape(weights.shape)
        if conv.use_bias:
            params[f"{conv.key}/biases:0"] = conv.biases.numpy() @ mix
        new_var = var @ np.square(mix)
        shape = bn.gamma.shape
        params.update({f"{bn.key}/{name}:0": np.reshape(value, shape) for name, value in (
            ("gamma", np.sqrt(new_var + bn.epsilon)), ("beta", beta @ kernel), ("moving_mean", mean @ mix),
            ("moving_variance", new_var))})
    plain.set_params(params)
    for key, compactor in compactors.items():
        plain.groups[key].set_mask(compactor.mask.numpy())
    return plain
