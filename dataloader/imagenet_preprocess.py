"""Per-image ImageNet preprocessing: record parsing, training crops and evaluation crops."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dataloader import seeds
from dataloader.base import normalise

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}

# Random-resized-crop ranges: fraction of the image area, and width / height.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Attempts before the sampler falls back to the whole image.
CROP_ATTEMPTS = 10


def parse_record(record: tf.Tensor, label_offset: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Splits a serialised ``tf.train.Example`` into JPEG bytes and a 0-based label.

    Args:
        record: Scalar string tensor.
        label_offset: Subtracted from the stored label (1 for the standard conversion,
            which stores 1..1000).

    Returns:
        ``(encoded JPEG, int32 label)``.
    """
    parsed = tf.io.parse_single_example(record, FEATURES)
    label = tf.cast(parsed["image/class/label"] - label_offset, tf.int32)
    return parsed["image/encoded"], label


def parse_label(record: tf.Tensor, label_offset: int) -> tf.Tensor:
    """The 0-based int32 label of a serialised ``tf.train.Example`` (the image is not copied)."""
    parsed = tf.io.parse_single_example(record, {"image/class/label": FEATURES["image/class/label"]})
    return tf.cast(parsed["image/class/label"] - label_offset, tf.int32)


def train_image(
    encoded: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tf.Tensor:
    """Random-resized crop and random flip of one JPEG, then normalisation.

    The crop window is sampled from the JPEG header alone and only that window is
    decoded, which is the expensive part of the pipeline.

    Args:
        encoded: Scalar string tensor holding a JPEG.
        seed: Int64 ``[2]`` stateless seed of this example.
        image_size: Output height and width.
        mean: Per-channel mean of 0..255 pixels.
        std: Per-channel standard deviation.

    Returns:
        A float32 ``[image_size, image_size, 3]`` image.
    """
    crop_seed, flip_seed = seeds.split_seed(seed, 2)
    shape = tf.io.extract_jpeg_shape(encoded)
    # The whole image is the "object", so the crop is constrained by area_range only.
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole_image,
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image.set_shape([image_size, image_size, 3])
    return normalise(image, mean, std)


def eval_image(
    encoded: tf.Tensor,
    image_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tf.Tensor:
    """Resizes the shorter side to ``resize_size``, centre-crops ``image_size``, normalises.

    Args:
        encoded: Scalar string tensor holding a JPEG.
        image_size: Output height and width.
        resize_size: Length of the shorter side before cropping (>= image_size).
        mean: Per-channel mean of 0..255 pixels.
        std: Per-channel standard deviation.

    Returns:
        A float32 ``[image_size, image_size, 3]`` image.
    """
    image = tf.io.decode_jpeg(encoded, channels=3)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_size / tf.reduce_min(hw)
    # max() guards against rounding the shorter side just below the crop size.
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), resize_size)
    image = tf.image.resize(image, new_hw, antialias=True)
    top = (new_hw[0] - image_size) // 2
    left = (new_hw[1] - image_size) // 2
    image = image[top : top + image_size, left : left + image_size, :]
    image.set_shape([image_size, image_size, 3])
    return normalise(image, mean, std)
