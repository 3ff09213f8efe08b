"""MNIST: IDX parsing (plain and gzip), values, and errors that name the file."""
import numpy as np
import pytest
import tensorflow as tf

from dataloader import Mnist, build_dataset
from tests.support import data as fakes
from utils.errors import ConfigError, DataError


@pytest.mark.parametrize("gz", [True, False])
def test_reads_plain_and_gzipped_files(tmp_path, gz):
    fake = fakes.write_mnist(tmp_path, gz=gz)
    dataset = build_dataset("mnist", tmp_path)
    for arrays, split in ((dataset.train_arrays(), fake.train), (dataset.test_arrays(), fake.test)):
        images, labels = arrays
        assert images.shape == (len(split.labels), 28, 28, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, split.images)
        np.testing.assert_array_equal(labels, split.labels)
    info = dataset.info
    assert (info.num_train, info.num_test, info.num_classes, info.image_shape) == (30, 20, 10, (28, 28, 1))


def test_normalisation_matches_the_usual_formula(tmp_path):
    fake = fakes.write_mnist(tmp_path, num_train=4, num_test=3)
    images, labels = next(iter(Mnist(tmp_path).test(8)))
    assert images.shape == (3, 28, 28, 1) and labels.dtype == tf.int32
    expected = (fake.test.images / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(images.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_training_has_no_augmentation_by_default(tmp_path):
    fakes.write_mnist(tmp_path, num_train=12, num_test=2)
    dataset = Mnist(tmp_path)
    augmented = next(iter(dataset.train(12, 0, 0)))[0].numpy()
    plain = next(iter(dataset.train(12, 0, 0, augment=False)))[0].numpy()
    np.testing.assert_array_equal(augmented, plain)


def test_optional_shift_moves_the_digit(tmp_path):
    fakes.write_mnist(tmp_path, num_train=12, num_test=2)
    dataset = Mnist(tmp_path, max_shift=2)
    shifted = next(iter(dataset.train(12, 0, 0)))[0].numpy()
    plain = next(iter(dataset.train(12, 0, 0, augment=False)))[0].numpy()
    assert shifted.shape == (12, 28, 28, 1)
    assert not np.array_equal(shifted, plain)
    # The shift is a crop of the image padded with black.
    background = (0 - 0.1307 * 255) / (0.3081 * 255)
    padded = np.pad(plain[0], [(2, 2), (2, 2), (0, 0)], constant_values=background)
    crops = [padded[y : y + 28, x : x + 28] for y in range(5) for x in range(5)]
    assert any(np.allclose(c, shifted[0]) for c in crops)
    with pytest.raises(ConfigError):
        Mnist(tmp_path, max_shift=-1)


def test_missing_training_images_are_named_but_test_still_works(tmp_path):
    fake = fakes.write_mnist(tmp_path, num_train=5, num_test=4)
    fake.files["train-images-idx3-ubyte"].unlink()
    dataset = Mnist(tmp_path)
    assert dataset.test_arrays()[0].shape == (4, 28, 28, 1)
    assert dataset.info.num_train == 5  # from the labels header
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        dataset.train_arrays()


def test_truncated_file_is_named(tmp_path):
    fake = fakes.write_mnist(tmp_path, gz=False)
    path = fake.files["t10k-images-idx3-ubyte"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        Mnist(tmp_path).test_arrays()


def test_truncated_gzip_is_named(tmp_path):
    fake = fakes.write_mnist(tmp_path, gz=True)
    path = fake.files["train-labels-idx1-ubyte"]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        Mnist(tmp_path).train_arrays()


def test_extra_bytes_and_short_header(tmp_path):
    fake = fakes.write_mnist(tmp_path, gz=False)
    path = fake.files["t10k-labels-idx1-ubyte"]
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*2 unexpected bytes"):
        Mnist(tmp_path).test_arrays()
    path.write_bytes(b"\0\0\x08\x01\0")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*truncated"):
        Mnist(tmp_path).test_arrays()


def test_labels_file_where_images_are_expected(tmp_path):
    fake = fakes.write_mnist(tmp_path, gz=False)
    images = fake.files["t10k-images-idx3-ubyte"]
    images.write_bytes(fake.files["t10k-labels-idx1-ubyte"].read_bytes())
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic number is 2049, expected 2051"):
        Mnist(tmp_path).test_arrays()


def test_wrong_image_size_and_label_count(tmp_path):
    fake = fakes.write_mnist(tmp_path, num_train=3, num_test=3, gz=False)
    fake.files["t10k-images-idx3-ubyte"].write_bytes(
        fakes.idx_bytes(np.zeros((3, 32, 32), np.uint8), 2051)
    )
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*expected \\(28, 28\\)"):
        Mnist(tmp_path).test_arrays()
    fake.files["train-labels-idx1-ubyte"].write_bytes(fakes.idx_bytes(np.zeros(2, np.uint8), 2049))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*2 labels for the 3 images"):
        Mnist(tmp_path).train_arrays()


def test_missing_folder_and_folder_without_files(tmp_path):
    with pytest.raises(DataError, match="absent"):
        Mnist(tmp_path / "absent")
    with pytest.raises(DataError, match=f"{tmp_path}.*t10k-images-idx3-ubyte"):
        Mnist(tmp_path)


def test_gzip_file_that_is_not_gzip(tmp_path):
    fakes.write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"plain, not gzip" * 4)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*gzip"):
        Mnist(tmp_path).test_arrays()


def test_keras_fallback(monkeypatch):
    x = np.zeros((6, 28, 28), np.uint8)
    y = np.arange(6, dtype=np.uint8)
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", lambda: ((x, y), (x[:2], y[:2])))
    dataset = build_dataset("mnist")
    assert dataset.train_arrays()[0].shape == (6, 28, 28, 1)
    assert dataset.info.num_test == 2


def test_image_size_resizes_every_split_once_at_load_time(tmp_path):
    fake = fakes.write_mnist(tmp_path, num_train=6, num_test=4, gz=False)
    constant = np.full((4, 28, 28), 77, np.uint8)
    fake.files["t10k-images-idx3-ubyte"].write_bytes(fakes.idx_bytes(constant, 2051))
    dataset = Mnist(tmp_path, image_size=32)
    assert dataset.info.image_shape == (32, 32, 1)
    images, labels = dataset.train_arrays()
    assert images.shape == (6, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, fake.train.labels)
    # Bilinear with antialiasing, rounded back to uint8.
    want = tf.image.resize(fake.train.images, (32, 32), method="bilinear", antialias=True).numpy()
    np.testing.assert_array_equal(images, np.clip(np.rint(want), 0, 255).astype(np.uint8))
    assert not np.array_equal(images[:, 2:30, 2:30], fake.train.images)  # resized, not padded
    # A constant image stays constant; the pipeline normalises the resized pixels.
    test_images, test_labels = dataset.test_arrays()
    np.testing.assert_array_equal(test_images, np.full((4, 32, 32, 1), 77, np.uint8))
    np.testing.assert_array_equal(test_labels, fake.test.labels)
    batch, _ = next(iter(dataset.test(8)))
    np.testing.assert_allclose(batch.numpy(), (77 / 255.0 - 0.1307) / 0.3081, rtol=1e-5)
    assert dataset.test_arrays()[0] is test_images  # read and resized once


def test_shift_augmentation_crops_at_the_resized_size(tmp_path):
    fakes.write_mnist(tmp_path, num_train=4, num_test=2)
    dataset = Mnist(tmp_path, max_shift=2, image_size=32)
    shifted = next(iter(dataset.train(4, 0, 0)))[0].numpy()
    plain = next(iter(dataset.train(4, 0, 0, augment=False)))[0].numpy()
    assert shifted.shape == plain.shape == (4, 32, 32, 1)
    background = (0 - 0.1307 * 255) / (0.3081 * 255)
    padded = np.pad(plain[0], [(2, 2), (2, 2), (0, 0)], constant_values=background)
    assert any(np.allclose(padded[y : y + 32, x : x + 32], shifted[0]) for y in range(5) for x in range(5))
    with pytest.raises(ConfigError, match="image_size must be positive"):
        Mnist(tmp_path, image_size=0)


def test_keras_fallback_is_resized_too(monkeypatch):
    x = np.full((3, 28, 28), 200, np.uint8)
    y = np.arange(3, dtype=np.uint8)
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", lambda: ((x, y), (x[:2], y[:2])))
    dataset = build_dataset("mnist", image_size=32)
    np.testing.assert_array_equal(dataset.train_arrays()[0], np.full((3, 32, 32, 1), 200, np.uint8))
    assert dataset.test_arrays()[0].shape == (2, 32, 32, 1) and dataset.info.num_test == 2
