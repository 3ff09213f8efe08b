"""Seeding for reproducible runs."""
import hashlib
import operator
import random

import numpy as np
import tensorflow as tf

_SEED_MASK = 0x7FFFFFFF  # 31 bits: a valid seed for numpy, TF and every 32-bit API


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seeds Python's ``random``, numpy and TensorFlow.

    Args:
        seed: The base seed.
        deterministic: Also make TensorFlow ops deterministic
            (``tf.config.experimental.enable_op_determinism``). This costs speed, lasts
            for the rest of the process, and makes ops without a deterministic kernel
            raise instead of silently varying.
    """
    seed = operator.index(seed)
    random.seed(seed)
    np.random.seed(seed & _SEED_MASK)  # numpy refuses seeds outside [0, 2**32)
    tf.random.set_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def fold_seed(seed: int, *ints: int) -> int:
    """Derives a new seed from a base seed and integers such as the epoch or replica id.

    Uses SHA-256 rather than ``hash()``, which is salted per process for strings and so
    would not reproduce across runs. Different argument tuples give unrelated seeds,
    unlike ``seed + epoch``, where (seed=1, epoch=2) and (seed=2, epoch=1) collide.

    Args:
        seed: The base seed.
        *ints: Further integers to fold in (order matters).

    Returns:
        An integer in [0, 2**31).
    """
    values = [operator.index(seed)] + [operator.index(value) for value in ints]
    digest = hashlib.sha256(",".join(str(value) for value in values).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MASK
