"""Tests for utils.logs."""
import glob
import io
import logging

import numpy as np
import pytest
import tensorflow as tf

from utils.errors import ConfigError
from utils.logs import Progress, Scalars, get_logger, setup_logging


class _Terminal(io.StringIO):
    def isatty(self):
        return True


# --- Progress ------------------------------------------------------------------------


def test_progress_plain_lines_when_stdout_is_not_a_terminal(capsys):
    losses = [2.0, 1.5, 1.25, 1.0, 0.5]
    with Progress(total=5, desc="train", log_every=2) as progress:
        for step, loss in enumerate(losses, 1):
            progress.update(loss=loss, acc=step / 10)
    assert capsys.readouterr().out.splitlines() == [
        "train step 2/5 loss=1.5000 acc=0.2000",
        "train step 4/5 loss=1.0000 acc=0.4000",
        "train step 5/5 loss=0.5000 acc=0.5000",
    ]


def test_progress_final_line_not_repeated_and_unknown_total(capsys):
    with Progress(desc="eval", log_every=3) as progress:
        progress.update(2, loss=np.float32(0.25))
        progress.update(1, acc=tf.constant(0.5))  # earlier postfix values persist
    progress.close()  # closing twice prints nothing more
    assert capsys.readouterr().out.splitlines() == ["eval step 3 loss=0.2500 acc=0.5000"]


def test_progress_write_in_plain_mode():
    out = io.StringIO()
    with Progress(total=2, file=out) as progress:
        progress.write("epoch 1 done")
        progress.update(2, loss=1)
    assert out.getvalue().splitlines() == ["epoch 1 done", "step 2/2 loss=1"]


def test_progress_draws_a_bar_on_a_terminal():
    out = _Terminal()
    with Progress(total=3, desc="train", log_every=1, file=out) as progress:
        for _ in range(3):
            progress.update(loss=0.75)
    text = out.getvalue()
    assert "train" in text and "3/3" in text and "loss=0.75" in text
    assert "train step" not in text  # no plain lines mixed in
    assert "\r" in text  # redrawn in place


def test_progress_bar_without_total():
    out = _Terminal()
    with Progress(desc="stream", file=out) as progress:
        progress.update(5, acc=0.5)
    assert "5" in out.getvalue() and "acc=0.5" in out.getvalue()


# --- logging -------------------------------------------------------------------------


@pytest.fixture
def clean_root():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_setup_logging_to_file_with_plain_format(tmp_path, clean_root, capsys):
    log_file = tmp_path / "logs" / "run.log"
    setup_logging(str(log_file), level="info")
    log = get_logger("toolkit.test")
    log.info("hello %d", 5)
    log.debug("hidden")
    for handler in clean_root.handlers:
        handler.flush()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" INFO toolkit.test: hello 5")
    assert "INFO toolkit.test: hello 5" in capsys.readouterr().err


def test_setup_logging_twice_does_not_duplicate_handlers(clean_root):
    before = len(clean_root.handlers)
    setup_logging(level="DEBUG")
    setup_logging(level=logging.WARNING)
    assert len(clean_root.handlers) == before + 1
    assert clean_root.level == logging.WARNING


def test_setup_logging_rejects_unknown_level(clean_root):
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'"):
        setup_logging(level="LOUD")


def test_get_logger_adds_no_handlers():
    log = get_logger("toolkit.quiet")
    assert log.name == "toolkit.quiet" and log.handlers == []


# --- Scalars -------------------------------------------------------------------------


def _read_events(logdir, plugins=None):
    found = []
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
                if plugins is not None and value.metadata.plugin_data.plugin_name:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
    return found


def test_scalars_written_to_event_file(tmp_path):
    logdir = tmp_path / "tb"
    with Scalars(str(logdir)) as writer:
        writer.scalar("train/loss", 0.5, step=1)
        writer.scalars({"val/acc": np.float32(0.75), "lr": tf.constant(0.125)}, step=2)
        writer.flush()
        assert ("train/loss", 1, 0.5) in _read_events(logdir)  # visible after flush
    writer.close()  # idempotent
    plugins = {}
    assert sorted(_read_events(logdir, plugins)) == [
        ("lr", 2, 0.125), ("train/loss", 1, 0.5), ("val/acc", 2, 0.75)
    ]
    # TensorBoard files these under its scalars dashboard.
    assert plugins == {"lr": "scalars", "train/loss": "scalars", "val/acc": "scalars"}
