"""Tiny datasets written in the real on-disk formats, for tests.

Usage from any test package::

    from tests.support.data import write_cifar10
    fake = write_cifar10(tmp_path)            # tmp_path / "cifar-10-batches-py"
    dataset = build_dataset("cifar10", fake.path)

Every writer returns a :class:`FakeData` holding the arrays it wrote (uint8 NHWC
images, 0-based int64 labels), so tests can compare what the loaders read back.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import tensorflow as tf

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"


@dataclasses.dataclass
class FakeSplit:
    """One split as written: uint8 NHWC images (a list for ImageNet) and 0-based int64 labels."""

    images: np.ndarray | list
    labels: np.ndarray


@dataclasses.dataclass
class FakeData:
    """A fake dataset on disk.

    Attributes:
        path: What to pass as ``data_path``.
        train: The training split.
        test: The test split.
        files: Every file written, by name (e.g. ``"data_batch_1"``) or shard path.
    """

    path: Path
    train: FakeSplit
    test: FakeSplit
    files: dict[str, Path] = dataclasses.field(default_factory=dict)


def random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``n`` random uint8 images of ``shape``."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ----- CIFAR ---------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
    """Writes ``bytes`` as Python-2 ``str`` opcodes, like the official CIFAR files.

    Python 3 writes bytes at protocol 2 as a call to ``_codecs.encode``, a global the
    loader rightly refuses; Python 2 wrote SHORT_BINSTRING / BINSTRING instead.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def py2_pickle(obj, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """Pickles ``obj`` at protocol 2 the way Python 2 with an old numpy did.

    Args:
        obj: Dicts, lists, ints, bytes and numpy arrays.
        numpy_module: Module named for ``_reconstruct``; the official files say
            ``numpy.core.multiarray`` (numpy 2 itself writes ``numpy._core.multiarray``).

    Returns:
        The pickle bytes.
    """
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue()
    # Protocol 2 has no frame lengths, so renaming a GLOBAL's module in place is safe.
    for module in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        data = data.replace(b"c" + module + b"\n", b"c" + numpy_module.encode() + b"\n")
    return data


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 images -> the official N x 3072 rows (R plane, G plane, B plane)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def cifar_batch(rows: np.ndarray, labels, label_key: bytes = b"labels", **extra) -> bytes:
    """One official CIFAR batch file's bytes.

    Args:
        rows: ``N x 3072`` uint8 data (anything, for malformed-file tests).
        labels: Labels, stored as a list of ints like the official files.
        label_key: ``b"labels"`` or ``b"fine_labels"``.
        **extra: More entries, keyed by their name encoded as bytes.
    """
    batch = {b"batch_label": b"fake batch", b"data": rows, label_key: [int(v) for v in labels]}
    batch.update({k.encode(): v for k, v in extra.items()})
    return py2_pickle(batch)


def write_cifar10(root, per_batch: int = 20, num_test: int = 20, seed: int = 0) -> FakeData:
    """Writes ``root/cifar-10-batches-py`` with 5 training batches, a test batch and meta.

    Args:
        root: Parent folder (created if needed).
        per_batch: Images per training batch (the official files hold 10000).
        num_test: Test images.
        seed: Seed of the random images and labels.

    Returns:
        The data written; ``path`` is the ``cifar-10-batches-py`` folder.
    """
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images = random_images(5 * per_batch, (32, 32, 3), seed + 1)
    train_labels = rng.integers(0, 10, 5 * per_batch).astype(np.int64)
    test_images = random_images(num_test, (32, 32, 3), seed + 2)
    test_labels = rng.integers(0, 10, num_test).astype(np.int64)
    files = {}
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        files[f"data_batch_{i + 1}"] = folder / f"data_batch_{i + 1}"
        files[f"data_batch_{i + 1}"].write_bytes(
            cifar_batch(cifar_rows(train_images[part]), train_labels[part])
        )
    files["test_batch"] = folder / "test_batch"
    files["test_batch"].write_bytes(cifar_batch(cifar_rows(test_images), test_labels))
    files["batches.meta"] = folder / "batches.meta"
    files["batches.meta"].write_bytes(
        py2_pickle({b"label_names": [b"class%d" % i for i in range(10)],
                    b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    )
    return FakeData(folder, FakeSplit(train_images, train_labels),
                    FakeSplit(test_images, test_labels), files)


def write_cifar100(root, num_train: int = 40, num_test: int = 20, seed: int = 0) -> FakeData:
    """Writes ``root/cifar-100-python`` with ``train``, ``test`` and ``meta``.

    Returns:
        The data written (fine labels); ``path`` is the ``cifar-100-python`` folder.
    """
    folder = Path(root) / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    files = {}
    for name, n in (("train", num_train), ("test", num_test)):
        images = random_images(n, (32, 32, 3), seed + len(name))
        fine = rng.integers(0, 100, n).astype(np.int64)
        fine[0] = 99  # make sure the top of the label range is exercised
        files[name] = folder / name
        files[name].write_bytes(
            cifar_batch(cifar_rows(images), fine, b"fine_labels",
                        coarse_labels=[int(v) // 5 for v in fine],
                        filenames=[b"img%d.png" % i for i in range(n)])
        )
        splits[name] = FakeSplit(images, fine)
    files["meta"] = folder / "meta"
    files["meta"].write_bytes(py2_pickle({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    return FakeData(folder, splits["train"], splits["test"], files)


def make_tar_gz(folder, archive) -> Path:
    """Packs ``folder`` into the gzipped tar ``archive`` under the folder's own name."""
    folder, archive = Path(folder), Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


# ----- MNIST ---------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file's bytes: big-endian magic, one uint32 per dimension, then the data."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_mnist(folder, num_train: int = 30, num_test: int = 20, gz: bool = True,
                seed: int = 0, balanced: bool = False) -> FakeData:
    """Writes the four official MNIST IDX files into ``folder``.

    Args:
        folder: Destination (created if needed).
        num_train: Training images.
        num_test: Test images.
        gz: Write ``*.gz`` files (as distributed) instead of plain ones.
        seed: Seed of the random images and labels.

    Returns:
        The data written; images are ``(N, 28, 28, 1)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits, files = {}, {}
    for split, prefix, n in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = random_images(n, (28, 28), seed + n)
        labels = (rng.permutation(np.arange(n) % 10) if balanced else rng.integers(0, 10, n)).astype(np.int64)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array, magic)
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(data) if gz else data)
            files[name] = path
        splits[split] = FakeSplit(images[..., np.newaxis], labels)
    return FakeData(folder, splits["train"], splits["test"], files)


# ----- ImageNet ------------------------------------------------------------------------
def imagenet_example(image: np.ndarray, label: int) -> bytes:
    """A serialised ``tf.train.Example`` as the standard ImageNet conversion writes it."""
    encoded = tf.io.encode_jpeg(image, quality=95).numpy()
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[image.shape[0]])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[image.shape[1]])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"JPEG"])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_imagenet(folder, train_shards: int = 3, per_train_shard: int = 5,
                   val_shards: int = 2, per_val_shard: int = 4,
                   image_hw: tuple[int, int] = (40, 50), seed: int = 0) -> FakeData:
    """Writes ``train-0000i-of-0000n`` and ``validation-...`` TFRecord shards of small JPEGs.

    Labels are stored 1-based (1..1000) as in the standard conversion; the returned
    :class:`FakeData` holds them 0-based, in shard order. Images alternate between
    height x width and width x height so that both orientations are exercised.

    Returns:
        The data written; ``files`` maps each shard path's name to the path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits, files = {}, {}
    for split, prefix, shards, per in (("train", "train", train_shards, per_train_shard),
                                       ("test", "validation", val_shards, per_val_shard)):
        images, labels = [], []
        for s in range(shards):
            path = folder / f"{prefix}-{s:05d}-of-{shards:05d}"
            with tf.io.TFRecordWriter(str(path)) as writer:
                for k in range(per):
                    hw = image_hw if k % 2 == 0 else image_hw[::-1]
                    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
                    label = int(rng.integers(0, 1000))
                    writer.write(imagenet_example(image, label + 1))
                    images.append(image)
                    labels.append(label)
            files[path.name] = path
        splits[split] = FakeSplit(images, np.asarray(labels, np.int64))
    return FakeData(folder, splits["train"], splits["test"], files)
