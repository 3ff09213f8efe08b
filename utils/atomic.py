"""Crash-safe file writes: a reader sees either the old file or the complete new one.

Data goes to a temporary file in the target's directory (so the final ``os.replace`` is a
rename within one file system, which POSIX makes atomic), is flushed and fsynced, and only
then replaces the target. If anything fails on the way, the temporary file is removed and
an existing target is left exactly as it was.
"""
import contextlib
import json
import os
import stat
import tempfile
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

# mkstemp creates files with mode 0600; a new target gets the usual mode for data files
# instead, while an existing target keeps its own mode.
_NEW_FILE_MODE = 0o644


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable; best effort (not possible on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Opens a temporary file that replaces ``path`` when the ``with`` block succeeds.

    The parent directory is created if needed. If the block raises (including
    KeyboardInterrupt), the temporary file is deleted and ``path`` is not touched.

    Args:
        path: The file to (over)write.
        mode: ``"wb"`` for bytes or ``"w"``/``"wt"`` for text; reading or appending modes
            make no sense for a fresh replacement file and are refused.
        encoding: Text encoding, used only in text mode.

    Yields:
        The open temporary file object.

    Raises:
        ValueError: If ``mode`` is not a plain write mode.
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_open supports modes 'w', 'wt' and 'wb', not {mode!r}")
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    try:
        target_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        target_mode = _NEW_FILE_MODE

    # Same directory as the target: os.replace must not cross file systems.
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        text_kwargs = {} if "b" in mode else {"encoding": encoding}
        with os.fdopen(fd, mode, **text_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_path, target_mode)
        os.replace(tmp_path, path)
    except BaseException:
        # fdopen owns (and has closed) fd by now, unless fdopen itself failed.
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replaces ``path`` with ``data``.

    Args:
        path: The file to (over)write; its parent directory is created if needed.
        data: The complete new contents.
    """
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replaces ``path`` with ``text``.

    Args:
        path: The file to (over)write; its parent directory is created if needed.
        text: The complete new contents.
        encoding: Text encoding of the file.
    """
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Atomically writes ``obj`` as JSON (indent 2, sorted keys, trailing newline).

    The object is serialised before any file is created, so an unserialisable object
    raises TypeError without leaving anything behind.

    Args:
        path: The file to (over)write; its parent directory is created if needed.
        obj: A JSON-serialisable object.
    """
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_text(path, text)
