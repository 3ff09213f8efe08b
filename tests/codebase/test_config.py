"""The run configuration: precedence of its sources, validation, and bad `--config` files."""

import json

import pytest

import train_cifar
from codebase.config import Config, parse_config
from utils.errors import ConfigError


def test_precedence_defaults_script_preset_method_preset_file_flags(tmp_path):
    preset = Config(arch="VGG-16", learning_rate=0.3, weight_decay=2e-4, batch_size=64, seed=5)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"weight_decay": 3e-4, "batch_size": 32, "seed": 6, "decay_points": [0.5, 0.75],
                                  "knowledge": True}))
    cfg = parse_config(["--method", "ekg", "--config", str(config), "--batch_size", "16", "--no-knowledge"], preset)
    assert cfg.momentum == Config().momentum  # set by nothing but the dataclass
    assert cfg.arch == "VGG-16"  # the script's preset over the dataclass default
    assert (cfg.learning_rate, cfg.decay_rate) == (0.01, 0.2)  # --method ekg's preset over the script's
    assert (cfg.weight_decay, cfg.seed, cfg.decay_points) == (3e-4, 6, (0.5, 0.75))  # the file over both presets
    assert (cfg.batch_size, cfg.knowledge) == (16, False)  # flags over the file
    # Without the method, its preset does not apply; without flags, the file's values stay.
    cfg = parse_config(["--config", str(config)], preset)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.batch_size, cfg.knowledge) == (0.3, 3e-4, 32, True)
    assert parse_config([], preset) == preset


@pytest.mark.parametrize("flags, message", [
    (["--train_epoch", "0"], "--train_epoch must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be positive"),
    (["--batch_size", "10", "--num_replicas", "4"], "--batch_size 10 must be a multiple of --num_replicas x --accum"),
    (["--decay_points", "0.6", "0.3"], "--decay_points must be increasing fractions"),
    (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
    (["--search_target_rate", "1"], r"--search_target_rate must be in \(0, 1\)"),
    (["--schedule", "linear"], "--schedule must be one of step, cosine"),
    (["--trained_param", "/nonexistent/params.pkl"], "--trained_param /nonexistent/params.pkl does not exist"),
])
def test_bad_values_are_one_line_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(flags)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),  # missing
    (b'{"seed": 1,', "cannot read it"),  # not JSON
    (b'{"train_path": "runs/\xe9t\xe9"}', "cannot read it"),  # Latin-1, not UTF-8
    (b'[["seed", 1]]', "expected a JSON object"),
    (b"3", "expected a JSON object"),
    (b'{"sed": 1}', "unknown field 'sed'"),
])
def test_a_bad_config_file_is_a_one_line_config_error(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--config", str(path)])
    assert str(err.value).startswith(f"--config {path}: ") and "\n" not in str(err.value)
    # The scripts print it as one line and exit with code 2, before anything is built.
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(["--config", str(path), "--train_path", str(tmp_path / "run")])
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {err.value}\n"
    assert not (tmp_path / "run").exists()
