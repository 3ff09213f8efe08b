"""The in-memory pipelines: determinism, sharding, batching, augmentation, eval order."""
import numpy as np
import pytest
import tensorflow as tf

from dataloader import CIFAR10, Cifar
from dataloader.cifar import CIFAR10_MEAN, CIFAR10_STD
from tests.support import data as fakes
from utils.errors import ConfigError


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return fakes.write_cifar10(tmp_path_factory.mktemp("c10"), per_batch=20, num_test=20)


@pytest.fixture(scope="module")
def dataset(fake):
    return Cifar(CIFAR10, fake.path)


def _batches(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def _normalised(images):
    return (images.astype(np.float32) - np.array(CIFAR10_MEAN, np.float32)) / np.array(
        CIFAR10_STD, np.float32
    )


def test_train_batches_shapes_and_types(dataset):
    batches = _batches(dataset.train(8, epoch=0, seed=1))
    assert len(batches) == 100 // 8 == dataset.steps_per_epoch(8)
    images, labels = batches[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (8,) and labels.dtype == np.int32


def test_same_seed_and_epoch_give_identical_batches(fake):
    first = _batches(Cifar(CIFAR10, fake.path).train(8, epoch=3, seed=7))
    # A fresh object and a changed global seed must not matter: the stream is pure.
    try:
        tf.random.set_seed(12345)
        second = _batches(Cifar(CIFAR10, fake.path).train(8, epoch=3, seed=7))
    finally:
        tf.random.set_seed(None)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_other_epoch_or_seed_changes_the_order(dataset):
    def order(epoch, seed):
        ds = dataset.train(100, epoch=epoch, seed=seed, augment=False)
        return next(iter(ds))[0].numpy()

    base = order(0, 1)
    assert not np.array_equal(base, order(1, 1))
    assert not np.array_equal(base, order(0, 2))
    # Still a permutation of the whole training set.
    flat = base.reshape(100, -1)
    expected = _normalised(dataset.train_arrays()[0]).reshape(100, -1)
    np.testing.assert_allclose(np.sort(flat, axis=0), np.sort(expected, axis=0), rtol=1e-6)


@pytest.mark.parametrize("augment", [False, True])
def test_two_shards_together_equal_the_unsharded_double_batch(dataset, augment):
    b = 8
    whole = _batches(dataset.train(2 * b, epoch=2, seed=5, augment=augment))
    shard0 = _batches(dataset.train(b, 2, 5, augment=augment, num_shards=2, shard_index=0))
    shard1 = _batches(dataset.train(b, 2, 5, augment=augment, num_shards=2, shard_index=1))
    assert len(whole) == len(shard0) == len(shard1) == 100 // (2 * b)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, shard0, shard1):
        # Shard i holds positions i::2 of the unsharded batch: same examples, same crops.
        np.testing.assert_array_equal(x[0::2], x0)
        np.testing.assert_array_equal(x[1::2], x1)
        np.testing.assert_array_equal(y[0::2], y0)
        np.testing.assert_array_equal(y[1::2], y1)


def test_shards_get_equal_step_counts_even_when_the_set_is_odd(tmp_path):
    # 5 x 3 = 15 examples, batch 7 per shard on 2 shards: one 14-example step each.
    fake = fakes.write_cifar10(tmp_path, per_batch=3, num_test=2)
    dataset = Cifar(CIFAR10, fake.path)
    counts = [len(_batches(dataset.train(7, 0, 0, num_shards=2, shard_index=i))) for i in (0, 1)]
    assert counts == [1, 1] == [dataset.steps_per_epoch(7, num_shards=2)] * 2


@pytest.mark.parametrize("augment", [False, True])
def test_two_consecutive_batches_equal_one_double_batch(dataset, augment):
    small = _batches(dataset.train(5, epoch=1, seed=9, augment=augment))
    large = _batches(dataset.train(10, epoch=1, seed=9, augment=augment))
    for k, (x, y) in enumerate(large):
        np.testing.assert_array_equal(x, np.concatenate([small[2 * k][0], small[2 * k + 1][0]]))
        np.testing.assert_array_equal(y, np.concatenate([small[2 * k][1], small[2 * k + 1][1]]))


def test_augmentation_is_a_flip_and_crop_of_the_reflect_padded_image(dataset):
    plain = _batches(dataset.train(50, epoch=4, seed=3, augment=False))
    augmented = _batches(dataset.train(50, epoch=4, seed=3, augment=True))
    flips, offsets = 0, set()
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        np.testing.assert_array_equal(yp, ya)
        assert xa.shape == xp.shape == (50, 32, 32, 3)
        for source, output in zip(xp, xa):
            padded = np.pad(source, [(4, 4), (4, 4), (0, 0)], mode="reflect")
            match = None
            for flipped, image in ((False, padded), (True, padded[:, ::-1])):
                for dy in range(9):
                    for dx in range(9):
                        if np.array_equal(image[dy : dy + 32, dx : dx + 32], output):
                            match = (flipped, dy, dx)
            assert match is not None, "output is not a flip/crop of the padded input"
            flips += match[0]
            offsets.add(match[1:])
    assert 20 < flips < 80 and len(offsets) > 20  # it really is random


def test_augmentation_does_not_depend_on_the_batch_size(dataset):
    # Each example is augmented from (seed, epoch, its index): batch 100 vs 4 x 25.
    one = np.concatenate([x for x, _ in _batches(dataset.train(100, 6, 2))])
    four = np.concatenate([x for x, _ in _batches(dataset.train(25, 6, 2))])
    np.testing.assert_array_equal(one, four)


def test_test_pipeline_keeps_order_and_the_last_partial_batch(dataset, fake):
    batches = _batches(dataset.test(8))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, fake.test.labels)
    np.testing.assert_allclose(images, _normalised(fake.test.images), rtol=1e-6)


def test_train_eval_yields_every_training_image_with_its_index(dataset, fake):
    batches = _batches(dataset.train_eval(32))
    assert [len(i) for _, _, i in batches] == [32, 32, 32, 4]
    images, labels, index = (np.concatenate(parts) for parts in zip(*batches))
    assert index.dtype == np.int64
    np.testing.assert_array_equal(index, np.arange(100))
    np.testing.assert_array_equal(labels, fake.train.labels)
    np.testing.assert_allclose(images, _normalised(fake.train.images), rtol=1e-6)


def test_arrays_are_read_only(dataset):
    images, labels = dataset.train_arrays()
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError):
        labels[0] = 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 4, "num_shards": 2, "shard_index": 2},
        {"batch_size": 4, "num_shards": 0},
        {"batch_size": 60, "num_shards": 2},  # 120 > 100 examples: no complete batch
    ],
)
def test_bad_batching_arguments(dataset, kwargs):
    with pytest.raises(ConfigError):
        dataset.train(epoch=0, seed=0, **kwargs)
