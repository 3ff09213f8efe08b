"""CIFAR-10/100: reading the official formats, pixel values, and refusing bad files."""
import numpy as np
import pytest
import tensorflow as tf

from dataloader import CIFAR10, CIFAR100, Cifar, build_dataset
from dataloader.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from tests.support import data as fakes
from utils.errors import DataError


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return fakes.write_cifar10(tmp_path_factory.mktemp("c10"))


def _assert_same_arrays(dataset, fake):
    train_x, train_y = dataset.train_arrays()
    test_x, test_y = dataset.test_arrays()
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    np.testing.assert_array_equal(train_x, fake.train.images)
    np.testing.assert_array_equal(train_y, fake.train.labels)
    np.testing.assert_array_equal(test_x, fake.test.images)
    np.testing.assert_array_equal(test_y, fake.test.labels)


def test_cifar10_folder_reads_every_batch_in_order(cifar10):
    dataset = build_dataset("cifar10", cifar10.path)
    _assert_same_arrays(dataset, cifar10)
    info = dataset.info
    assert (info.num_train, info.num_test, info.num_classes) == (100, 20, 10)
    assert info.image_shape == (32, 32, 3)
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)


def test_parent_folder_and_archives_give_the_same_data(cifar10, tmp_path):
    archive = fakes.make_tar_gz(cifar10.path, tmp_path / "cifar-10-python.tar.gz")
    for source in (cifar10.path.parent, archive, tmp_path):  # tmp_path holds the archive
        _assert_same_arrays(Cifar(CIFAR10, source), cifar10)


def test_cifar100_folder_parent_and_archive(tmp_path):
    fake = fakes.write_cifar100(tmp_path / "data")
    archive = fakes.make_tar_gz(fake.path, tmp_path / "cifar-100-python.tar.gz")
    for source in (fake.path, fake.path.parent, archive):
        dataset = build_dataset("CIFAR100", source)
        _assert_same_arrays(dataset, fake)
    assert dataset.info.num_classes == 100 and dataset.info.num_train == 40
    assert dataset.train_arrays()[1][0] == 99


def test_numpy2_module_name_is_also_accepted(tmp_path):
    fake = fakes.write_cifar10(tmp_path, per_batch=3, num_test=3)
    rows = fakes.cifar_rows(fake.test.images)
    batch = {b"data": rows, b"labels": [int(v) for v in fake.test.labels]}
    fake.files["test_batch"].write_bytes(fakes.py2_pickle(batch, "numpy._core.multiarray"))
    np.testing.assert_array_equal(Cifar(CIFAR10, fake.path).test_arrays()[0], fake.test.images)


def test_partial_batches_of_any_size(tmp_path):
    # The real shared copy holds 1017 images per batch and no filenames: N comes from the data.
    fake = fakes.write_cifar10(tmp_path, per_batch=7, num_test=3)
    assert Cifar(CIFAR10, fake.path).info.num_train == 35


def test_red_image_normalises_channel_zero_with_the_first_constant(tmp_path):
    fake = fakes.write_cifar10(tmp_path, per_batch=2, num_test=2)
    rows = np.zeros((2, 3072), np.uint8)
    rows[0, :1024] = 255  # the R plane comes first in a row
    rows[1, 1024 + 5 * 32 + 7] = 200  # G value of pixel (row 5, column 7)
    fake.files["test_batch"].write_bytes(fakes.cifar_batch(rows, [3, 4]))
    images, labels = next(iter(Cifar(CIFAR10, fake.path).test(8)))
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), [3, 4])
    red = images.numpy()[0, 0, 0]
    expected = [(255 - 113.9) / 66.7, (0 - 123.0) / 62.1, (0 - 125.3) / 63.0]
    np.testing.assert_allclose(red, expected, rtol=1e-5)
    np.testing.assert_allclose(images.numpy()[1, 5, 7, 1], (200 - 123.0) / 62.1, rtol=1e-5)
    np.testing.assert_allclose(images.numpy()[1, 5, 6, 1], (0 - 123.0) / 62.1, rtol=1e-5)


def test_cifar100_constants(tmp_path):
    fake = fakes.write_cifar100(tmp_path, num_train=4, num_test=2)
    images, _ = next(iter(Cifar(CIFAR100, fake.path).test(2)))
    pixel = fake.test.images[1, 3, 4].astype(np.float64)
    expected = (pixel - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    np.testing.assert_allclose(images.numpy()[1, 3, 4], expected, rtol=1e-5)
    assert CIFAR100_MEAN == (112.0, 124.0, 129.0) and CIFAR100_STD == (70.0, 65.0, 68.0)


def test_keras_fallback_is_used_without_data_path(monkeypatch):
    x = np.full((4, 32, 32, 3), 7, np.uint8)
    y = np.arange(4, dtype=np.uint8).reshape(4, 1)
    calls = []

    def fake_load_data(**kwargs):
        calls.append(kwargs)
        return (x, y), (x[:2], y[:2])

    monkeypatch.setattr(tf.keras.datasets.cifar100, "load_data", fake_load_data)
    dataset = build_dataset("cifar100")
    np.testing.assert_array_equal(dataset.train_arrays()[1], [0, 1, 2, 3])
    assert dataset.info.num_test == 2
    assert calls == [{"label_mode": "fine"}]  # one download serves both splits


def test_keras_download_failure_says_to_pass_data_path(monkeypatch):
    def offline(**kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tf.keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataError, match="--data_path"):
        build_dataset("cifar10").train_arrays()


# ----- bad inputs -----------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        Cifar(CIFAR10, missing)


def test_folder_without_cifar_files(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*cifar-10-batches-py"):
        Cifar(CIFAR10, tmp_path)


def test_missing_batch_file_is_named(tmp_path):
    fake = fakes.write_cifar10(tmp_path, per_batch=2, num_test=2)
    fake.files["data_batch_3"].unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        Cifar(CIFAR10, fake.path).train_arrays()


def test_truncated_pickle_is_named(tmp_path):
    fake = fakes.write_cifar10(tmp_path, per_batch=4, num_test=2)
    path = fake.files["data_batch_2"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="data_batch_2.*truncated"):
        Cifar(CIFAR10, fake.path).train_arrays()


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_pickle_with_forbidden_global_is_refused_without_running_it(tmp_path):
    fake = fakes.write_cifar10(tmp_path / "data", per_batch=2, num_test=2)
    marker = tmp_path / "pwned"
    payload = {b"data": _RunsCommand(f"touch {marker}"), b"labels": [0, 1]}
    fake.files["test_batch"].write_bytes(fakes.py2_pickle(payload))
    with pytest.raises(DataError, match=r"test_batch.*forbidden global (posix|nt|os)\.system"):
        Cifar(CIFAR10, fake.path).test_arrays()
    assert not marker.exists()


def test_codecs_only_rebuilds_latin1_bytes(tmp_path):
    import pickle

    fake = fakes.write_cifar10(tmp_path, per_batch=2, num_test=2)
    # Python 3 writes bytes at protocol 2 through _codecs.encode(text, "latin1"): admitted, as
    # it runs no code, so this file fails only for lacking the CIFAR entries.
    fake.files["test_batch"].write_bytes(pickle.dumps({b"data": b"x"}, protocol=2))
    with pytest.raises(DataError, match="test_batch: missing the b'data' or b'labels' entry"):
        Cifar(CIFAR10, fake.path).test_arrays()
    # Any other codec would be a way to call code: refused.
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xq\x01X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04."
    fake.files["test_batch"].write_bytes(evil)
    with pytest.raises(DataError, match="test_batch"):
        Cifar(CIFAR10, fake.path).test_arrays()


@pytest.mark.parametrize(
    "rows, labels, message",
    [
        (np.zeros((2, 3000), np.uint8), [0, 1], r"shape \(2, 3000\)"),
        (np.zeros((2, 3072), np.float32), [0, 1], "float32"),
        (np.zeros((2, 3072), np.uint8), [0], "labels have shape"),
        (np.zeros((2, 3072), np.uint8), [0, 10], r"label 10 is outside \[0, 10\)"),
        (np.zeros((2, 3072), np.uint8), [-1, 0], r"label -1 is outside"),
    ],
)
def test_malformed_batch_is_named(tmp_path, rows, labels, message):
    fake = fakes.write_cifar10(tmp_path, per_batch=2, num_test=2)
    fake.files["test_batch"].write_bytes(fakes.cifar_batch(rows, labels))
    with pytest.raises(DataError, match=f"test_batch.*{message}"):
        Cifar(CIFAR10, fake.path).test_arrays()


def test_not_a_dict_and_missing_entry(tmp_path):
    fake = fakes.write_cifar10(tmp_path, per_batch=2, num_test=2)
    fake.files["test_batch"].write_bytes(fakes.py2_pickle([1, 2]))
    with pytest.raises(DataError, match="test_batch.*expected a pickled dict"):
        Cifar(CIFAR10, fake.path).test_arrays()
    fake.files["test_batch"].write_bytes(fakes.py2_pickle({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DataError, match="test_batch.*missing"):
        Cifar(CIFAR10, fake.path).test_arrays()


def test_truncated_archive_is_named(cifar10, tmp_path):
    archive = fakes.make_tar_gz(cifar10.path, tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        Cifar(CIFAR10, archive).train_arrays()


def test_archive_without_the_member_is_named(tmp_path):
    fake = fakes.write_cifar10(tmp_path / "data", per_batch=2, num_test=2)
    fake.files["data_batch_5"].unlink()
    archive = fakes.make_tar_gz(fake.path, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*data_batch_5"):
        Cifar(CIFAR10, archive).train_arrays()


def test_plain_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        Cifar(CIFAR10, path)


def test_black_padding_fills_the_crop_border_with_normalised_black_pixels(tmp_path):
    from dataloader import CIFAR10, Cifar
    from tests.support.data import write_cifar10
    from utils.errors import ConfigError

    root = write_cifar10(tmp_path / "c", per_batch=4, num_test=4).path
    data = Cifar(CIFAR10, root, padding="black")
    image = np.full([32, 32, 3], 5.0, np.float32)
    black = -np.asarray(CIFAR10.mean, np.float32) / np.asarray(CIFAR10.std, np.float32)
    crops = [data._augment(tf.constant(image), tf.constant([seed, 1], tf.int64)).numpy() for seed in range(8)]
    values = np.unique(np.concatenate([c.reshape(-1, 3) for c in crops]), axis=0)
    assert {tuple(v) for v in values} <= {(5.0, 5.0, 5.0), tuple(black)} and len(values) == 2
    with pytest.raises(ConfigError, match="--cifar_padding must be one of reflect, black"):
        Cifar(CIFAR10, root, padding="zeros")
