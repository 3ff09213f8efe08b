"""Reading the official CIFAR "python version" files: a folder, its parent, or the .tar.gz.

Each file is a Python-2 pickle of a dict with bytes keys: ``b"data"`` is an N x 3072
uint8 array holding the R, G then B planes of 32x32 images, and the labels are a list
of N ints. N is taken from the arrays, never assumed (partial copies exist).
"""
from __future__ import annotations

import os
import tarfile

import numpy as np

from dataloader.files import one_line, read_bytes
from dataloader.safe_pickle import load_pickle
from utils.errors import DataError

_SIDE = 32
_PIXELS = 3 * _SIDE * _SIDE


class CifarFiles:
    """Where the official CIFAR files are: ``kind`` is ``"folder"`` or ``"archive"``.

    Attributes:
        kind: ``"folder"`` (a directory holding the batch files) or ``"archive"``.
        path: The folder or the ``.tar.gz`` file.
        folder_name: The official folder name, e.g. ``"cifar-10-batches-py"``.
    """

    def __init__(self, kind: str, path: str, folder_name: str):
        self.kind = kind
        self.path = path
        self.folder_name = folder_name

    def read(self, names: tuple[str, ...]):
        """Reads member files one after another.

        Args:
            names: File names inside the official folder, e.g. ``("data_batch_1",)``.

        Yields:
            ``(contents, source)`` per name, ``source`` naming the file for error messages.

        Raises:
            DataError: If a file is missing or unreadable.
        """
        if self.kind == "folder":
            for name in names:
                path = os.path.join(self.path, name)
                yield read_bytes(path), path
            return
        try:
            # One open for all members: a .tar.gz has no index, so every open re-inflates.
            with tarfile.open(self.path, "r:gz") as archive:
                for name in names:
                    yield self._read_member(archive, name)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - tarfile/gzip/zlib/EOF errors alike
            raise DataError(f"{self.path}: truncated or corrupt archive ({one_line(err)})") from None

    def _read_member(self, archive: tarfile.TarFile, name: str) -> tuple[bytes, str]:
        member_name = f"{self.folder_name}/{name}"
        member = _find_member(archive, member_name, name)
        if member is None:
            raise DataError(f"{self.path}: archive has no member {member_name}")
        source = f"{self.path}:{member.name}"
        handle = archive.extractfile(member)
        if handle is None:
            raise DataError(f"{source}: archive member is not a regular file")
        return handle.read(), source


def _find_member(archive: tarfile.TarFile, member_name: str, name: str):
    """The archive member for ``member_name``, tolerating a ``./`` prefix or no folder."""
    for candidate in (member_name, f"./{member_name}", name):
        try:
            return archive.getmember(candidate)
        except KeyError:
            continue
    return None


def locate(data_path: str | os.PathLike, folder_name: str, archive_name: str, marker: str) -> CifarFiles:
    """Finds the CIFAR files under ``data_path``.

    Accepted, in this order: the official folder itself (it holds ``marker``), a parent
    folder holding the official folder, a folder holding the official archive, or the
    archive itself.

    Args:
        data_path: What the user passed as ``--data_path``.
        folder_name: Official folder name, e.g. ``"cifar-10-batches-py"``.
        archive_name: Official archive name, e.g. ``"cifar-10-python.tar.gz"``.
        marker: A file the official folder always holds, e.g. ``"test_batch"``.

    Returns:
        Where to read the files from.

    Raises:
        DataError: If none of the accepted layouts is found.
    """
    path = os.fspath(data_path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (expected {folder_name}/ or {archive_name})")
    if os.path.isfile(path):
        if not _is_tar(path):
            raise DataError(f"{path}: not a folder and not a .tar.gz archive (expected {archive_name})")
        return CifarFiles("archive", path, folder_name)
    if os.path.isfile(os.path.join(path, marker)):
        return CifarFiles("folder", path, folder_name)
    inner = os.path.join(path, folder_name)
    if os.path.isdir(inner):
        return CifarFiles("folder", inner, folder_name)
    archive = os.path.join(path, archive_name)
    if os.path.isfile(archive):
        return CifarFiles("archive", archive, folder_name)
    raise DataError(
        f"{path}: holds neither the {folder_name} files ({marker}, ...), "
        f"nor a {folder_name}/ folder, nor {archive_name}"
    )


def _is_tar(path: str) -> bool:
    """Whether ``path`` looks like a tar archive; a damaged one counts as corrupt, not "no"."""
    try:
        return tarfile.is_tarfile(path)
    except Exception as err:  # noqa: BLE001 - gzip/EOF errors from a cut-off header
        raise DataError(f"{path}: truncated or corrupt archive ({one_line(err)})") from None


def _entry(batch: dict, key: bytes):
    """``batch[key]``, also accepting the str key that Python-3 pickles use."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode("ascii"))


def parse_batch(
    obj, source: str, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Checks and converts one unpickled CIFAR batch.

    Args:
        obj: The unpickled object.
        source: File name used in error messages.
        label_key: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
        num_classes: Labels must lie in ``[0, num_classes)``.

    Returns:
        (uint8 images ``[N, 32, 32, 3]`` in RGB order, int64 labels ``[N]``).

    Raises:
        DataError: If the batch is not a dict, misses an entry, or has a wrong shape,
            dtype or label.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    data = _entry(obj, b"data")
    labels = _entry(obj, label_key)
    if data is None or labels is None:
        raise DataError(f"{source}: missing the {b'data'!r} or {label_key!r} entry")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS or len(data) == 0:
        raise DataError(
            f"{source}: data has shape {data.shape} and dtype {data.dtype}, "
            f"expected (N, {_PIXELS}) uint8 with N > 0"
        )
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{source}: labels have shape {labels.shape} and dtype {labels.dtype}, "
            f"expected {len(data)} integers"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{source}: label {int(labels.min() if labels.min() < 0 else labels.max())} "
            f"is outside [0, {num_classes})"
        )
    # Rows are the R, G, B planes one after another: NCHW, turned into NHWC.
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_split(
    files: CifarFiles, names: tuple[str, ...], label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads and concatenates the batch files of one split.

    Args:
        files: Where the files are.
        names: Batch file names, in order.
        label_key: Key of the labels in each batch.
        num_classes: Number of classes, for the label check.

    Returns:
        (uint8 NHWC images, int64 labels) of all batches in order.

    Raises:
        DataError: If any file is missing, refused, truncated or malformed.
    """
    images, labels = [], []
    for contents, source in files.read(names):
        batch_images, batch_labels = parse_batch(
            load_pickle(contents, source), source, label_key, num_classes
        )
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)
