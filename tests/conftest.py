"""Test-wide set-up.

The CPU is split into two logical devices before TensorFlow initialises so that
multi-replica code (MirroredStrategy) runs on a CPU-only machine.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
