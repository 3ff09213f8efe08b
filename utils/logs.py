"""Logging, progress display and TensorBoard scalars."""
import logging
import numbers
import os
import sys
from typing import IO, Any, Dict, Mapping, Optional, Union

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from utils.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# Marks the handlers setup_logging installs, so a second call replaces them instead of
# printing every line twice.
_OWNED = "_toolkit_handler"


def get_logger(name: str) -> logging.Logger:
    """Returns the named logger.

    It adds no handler of its own (so it is safe to call at import time); its records go
    to whatever :func:`setup_logging` installed on the root logger, in :data:`LOG_FORMAT`.

    Args:
        name: Usually ``__name__``.
    """
    return logging.getLogger(name)


def setup_logging(log_file: Optional[str] = None, level: Union[str, int] = "INFO") -> None:
    """Sends log records to stderr and, optionally, to a file, in a plain format.

    Meant to be called once by an entry script; calling it again replaces the handlers
    of the previous call.

    Args:
        log_file: Also append records to this file (its directory is created).
        level: A level name such as ``"INFO"`` or ``"DEBUG"``, or a logging level number.

    Raises:
        ConfigError: If ``level`` is not a known logging level.
    """
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ConfigError(
                f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        level = number

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OWNED, False):
            root.removeHandler(handler)
            handler.close()

    handlers: list = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        directory = os.path.dirname(os.path.abspath(log_file))
        os.makedirs(directory, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _OWNED, True)
        root.addHandler(handler)
    root.setLevel(level)
    # TensorFlow and absl log through their own handler as well as the root's (every line twice),
    # and their INFO lines are internals (all-reduce plans, dataset sharding): warnings and
    # errors reach the root's handlers once.
    for name in ("tensorflow", "absl"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.setLevel(max(logging.WARNING, level))


def _plain(value: Any) -> Any:
    """Turns scalar tensors and numpy scalars into Python numbers for display."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        value = value.item()
    return value


def _fmt_value(value: Any) -> str:
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4f}"
    return str(value)


class Progress:
    """A progress display for a training or evaluation loop.

    On a terminal this is a tqdm bar with the postfix values (running loss, accuracy...).
    Elsewhere (log files, CI, pipes), where a redrawn bar turns into garbage, it prints a
    plain line every ``log_every`` steps and once at the end::

        train step 100/391 loss=1.2345 acc=0.5678

    Usage::

        with Progress(total=len(batches), desc="train") as progress:
            for batch in batches:
                ...
                progress.update(loss=loss, acc=acc)

    Args:
        total: The number of steps, or None if unknown (then lines read ``step 100``).
        desc: A label put in front of every line.
        log_every: In plain mode, print a line every this many steps.
        file: Where to write; defaults to ``sys.stdout`` at construction time.
        tty: Force bar (True) or plain (False) mode; by default the bar is used when
            ``file`` is a terminal.
    """

    def __init__(
        self,
        total: Optional[int] = None,
        desc: str = "",
        log_every: int = 100,
        file: Optional[IO[str]] = None,
        tty: Optional[bool] = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.total = total
        self.desc = desc
        self.log_every = log_every
        self.step = 0
        self.postfix: Dict[str, Any] = {}
        self._file = file if file is not None else sys.stdout
        if tty is None:
            isatty = getattr(self._file, "isatty", None)
            tty = bool(isatty and isatty())
        self._bar: Optional[tqdm] = (
            tqdm(total=total, desc=desc or None, file=self._file, dynamic_ncols=True)
            if tty else None
        )
        self._last_printed = 0
        self._closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by ``n`` steps and sets postfix values such as ``loss=0.3``.

        Postfix values persist until set again, so they may be passed only now and then.
        """
        self.step += n
        self.postfix.update({key: _plain(value) for key, value in postfix.items()})
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.step // self.log_every > self._last_printed // self.log_every:
            self._print_line()

    def line(self) -> str:
        """Returns the plain status line, e.g. ``train step 100/391 loss=1.2345``."""
        count = f"{self.step}/{self.total}" if self.total is not None else str(self.step)
        parts = [f"{self.desc} step {count}" if self.desc else f"step {count}"]
        parts += [f"{key}={_fmt_value(value)}" for key, value in self.postfix.items()]
        return " ".join(parts)

    def write(self, message: str) -> None:
        """Prints a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self._file)
        else:
            print(message, file=self._file, flush=True)

    def _print_line(self) -> None:
        print(self.line(), file=self._file, flush=True)
        self._last_printed = self.step

    def close(self) -> None:
        """Finishes the display; in plain mode prints the final line if not yet shown."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.step != self._last_printed or self.step == 0:
            self._print_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class Scalars:
    """Writes scalar summaries for TensorBoard, in the spirit of a ``SummaryWriter``.

    Built on ``tf.summary.create_file_writer`` and ``tf.summary.write`` rather than
    ``tf.summary.scalar``, because the latter needs the separate ``tensorboard`` package
    at run time. The events carry the scalars plugin's metadata, so TensorBoard shows
    them exactly like ``tf.summary.scalar`` output.

    Args:
        logdir: The event-file directory (created if needed).
    """

    def __init__(self, logdir: str) -> None:
        self.logdir = os.fspath(logdir)
        self._writer = tf.summary.create_file_writer(self.logdir)
        # What tensorboard's scalar summary attaches: plugin "scalars", content being a
        # serialised ScalarPluginData(version=0), which is empty.
        self._metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars", content=b"")
        )
        self._closed = False

    def _write(self, tag: str, value: Any, step: int) -> None:
        tensor = tf.cast(tf.reshape(value, []), tf.float32)
        tf.summary.write(tag, tensor, step=int(step), metadata=self._metadata)

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """Records ``value`` (a number or scalar tensor) under ``tag`` at ``step``."""
        with self._writer.as_default():
            self._write(tag, value, step)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Records several ``{tag: value}`` scalars at the same ``step``."""
        with self._writer.as_default():
            for tag, value in values.items():
                self._write(tag, value, step)

    def flush(self) -> None:
        """Writes buffered events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; further calls do nothing."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> "Scalars":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
