"""Tests for utils.atomic: a target is either fully replaced or left untouched."""
import json
import os
import stat

import pytest

from utils.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(directory):
    return sorted(os.listdir(directory))


def test_write_bytes_creates_file_and_parent_without_leftovers(tmp_path):
    target = tmp_path / "sub" / "dir" / "out.bin"
    atomic_write_bytes(target, b"\x00\x01payload")
    assert target.read_bytes() == b"\x00\x01payload"
    assert _names(target.parent) == ["out.bin"]


def test_write_replaces_existing_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_text(target, "new contents\n")
    assert target.read_text() == "new contents\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert _names(tmp_path) == ["out.txt"]


def test_new_file_gets_a_normal_mode_not_mkstemps_0600(tmp_path):
    target = tmp_path / "fresh.bin"
    atomic_write_bytes(target, b"x")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_writer_raising_midway_leaves_old_file_intact(tmp_path, error):
    target = tmp_path / "params.pkl"
    target.write_bytes(b"old contents")
    with pytest.raises(type(error)):
        with atomic_open(target, "wb") as handle:
            handle.write(b"half of the new")
            handle.flush()
            raise error
    assert target.read_bytes() == b"old contents"
    assert _names(tmp_path) == ["params.pkl"]  # the temporary file is gone


def test_writer_raising_without_existing_target_creates_nothing(tmp_path):
    target = tmp_path / "never.txt"
    with pytest.raises(ValueError):
        with atomic_open(target, "w") as handle:
            handle.write("partial")
            raise ValueError("boom")
    assert _names(tmp_path) == []


def test_text_mode_writes_utf8(tmp_path):
    target = tmp_path / "t.txt"
    with atomic_open(target, "w") as handle:
        handle.write("größe ✓")
    assert target.read_bytes() == "größe ✓".encode("utf-8")


def test_write_json_is_indented_and_sorted(tmp_path):
    target = tmp_path / "cfg.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2], "c": {"z": None, "y": 0.5}})
    text = target.read_text()
    assert text == json.dumps(
        {"a": [1, 2], "b": 1, "c": {"y": 0.5, "z": None}}, indent=2, sort_keys=True
    ) + "\n"
    assert text.startswith('{\n  "a": [\n')


def test_write_json_unserialisable_leaves_target_untouched(tmp_path):
    target = tmp_path / "cfg.json"
    target.write_text('{"old": true}')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == '{"old": true}'
    assert _names(tmp_path) == ["cfg.json"]


@pytest.mark.parametrize("mode", ["r", "a", "w+", "rb", "ab"])
def test_non_write_modes_are_refused(tmp_path, mode):
    with pytest.raises(ValueError, match="atomic_open supports"):
        with atomic_open(tmp_path / "x", mode):
            pass
    assert _names(tmp_path) == []
