"""EKG's memory bank: logits of interim sub-networks on every training image.

Teachers are picked from the search history (every accepted sub-network, the unpruned one
included, the final one excluded) at `num_teacher` evenly spaced levels of their search
cross-entropy, lowest first, so teacher 0 is the best interim sub-network. Each teacher is the
warmed-up net under its masks, slimmed (`nets.slim` gathers exactly the values the masked
forward pass uses, EKG's renorm included), and runs over the training images in natural order
with inference preprocessing and BN batch statistics (as in the search): a slimmed teacher
costs what its widths cost, with no mask or gather op.
"""

from __future__ import annotations

import numpy as np

from codebase.methods.ekg.search import set_masks
from nets import slim
from op_utils.traced import instance_function


def pick_teachers(losses, num_teacher: int) -> list:
    """Indices of `losses` nearest to `num_teacher` evenly spaced levels (without reuse).

    Levels are `min + k (max - min) / num_teacher` for k = 0..num_teacher-1; each takes the
    nearest unused entry. Fewer entries than teachers gives every entry once.
    """
    losses = np.asarray(losses, np.float64)
    if len(losses) <= num_teacher:
        return list(np.argsort(losses, kind="stable"))
    lo, hi = float(losses.min()), float(losses.max())
    levels = [lo + k * (hi - lo) / num_teacher for k in range(num_teacher)]
    free = np.ones(len(losses), bool)
    picked = []
    for level in levels:
        distance = np.where(free, np.abs(losses - level), np.inf)
        index = int(np.argmin(distance))
        picked.append(index)
        free[index] = False
    return picked


def teacher_settings(history, num_teacher: int) -> list:
    """The `(rates, orders)` of the teachers among a search's history `[(rates, orders, ce)]`:
    the final sub-network excluded (it is the student), the unpruned one (first) included."""
    interim = history[:-1] or history
    return [(interim[i][0], interim[i][1]) for i in pick_teachers([ce for _, _, ce in interim], num_teacher)]


def build_memory_bank(net, teachers, dataset, num_examples: int, out=None) -> np.ndarray:
    """Logits `[N, classes, T]` of each teacher `(rates, orders)` on the training set.

    Args:
        net: the masked net the search ran on (renorm on); its masks are set per teacher.
        teachers: list of `(rates, orders)`.
        dataset: batches of `(images, labels, index)` in natural order (inference preprocessing).
        num_examples: size of the training set.
        out: optional array `[N, classes, T]` to fill (e.g. a float16 `np.memmap` on disk, for
            a training set whose bank does not fit in memory); float32 in memory otherwise.
    """
    shape = [num_examples, net.groups["logits"].size, len(teachers)]
    bank = np.zeros(shape, np.float32) if out is None else out
    if list(bank.shape) != shape:
        raise ValueError(f"memory bank: out has shape {list(bank.shape)}, expected {shape}")
    groups = net.prunable_groups()
    for t, (rates, orders) in enumerate(teachers):
        set_masks(groups, rates, orders)
        teacher = slim(net)
        # Each teacher is a new net with its own trace, counted as its own (no retracing warning).
        forward = instance_function(teacher.__call__, reduce_retracing=True)
        for images, _, index in dataset:
            bank[index.numpy(), :, t] = forward(images, training=True).numpy()
    return bank
