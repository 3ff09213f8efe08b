"""The run configuration: precedence of its sources, method-owned options, chains, validation, and
bad `--config` files."""

import dataclasses
import json

import pytest

import train_cifar
from codebase.config import Config, OptimConfig, RunConfig, dataset_options, load_config, make_config, parse_config
from codebase.methods import get_method, method_names
from utils.errors import ConfigError

SCRIPT = dict(arch="VGG-16", dataset="cifar10", train_path="runs/x")


def test_precedence_defaults_recipe_method_script_file_step_flags(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"weight_decay": 3e-4, "batch_size": 32, "seed": 6, "decay_points": [0.5, 0.75],
                                  "knowledge": True, "trained_param": None,
                                  "steps": [{"method": "ekg", "learning_rate": 0.02}]}))
    cfg = parse_config(["--method", "ekg", "--config", str(config), "--batch_size", "16", "--no-knowledge"], SCRIPT)
    [baseline, ekg] = cfg.steps
    assert ekg.optim.warmup_epochs == OptimConfig().warmup_epochs  # set by nothing but the dataclass
    assert ekg.optim.decay_rate == 0.2  # the dataset's fine-tuning recipe, chosen by the method
    assert cfg.run.arch == "VGG-16"  # the script's defaults over the dataclass's
    assert (ekg.optim.weight_decay, cfg.run.seed, ekg.optim.decay_points) == (3e-4, 6, (0.5, 0.75))  # the file
    assert ekg.optim.learning_rate == 0.02  # the file's entry for the step, over its top-level fields
    assert (ekg.optim.batch_size, ekg.options.knowledge) == (16, False)  # flags over the file
    # The baseline EKG needs without --trained_param: the scratch recipe, the run's batch.
    assert (baseline.name, baseline.method, baseline.optim.learning_rate, baseline.optim.batch_size) == (
        "0-baseline", "none", 0.05, 16)
    assert baseline.optim.train_epoch == cfg.run.baseline_epoch


def test_the_dataset_recipe_follows_the_data_not_the_script():
    # train_imagenet.py --method ekg fine-tunes with ImageNet's weight decay and batch, not CIFAR's.
    imagenet = make_config({}, {"method": "ekg", "dataset": "imagenet", "train_path": "/tmp/x"}).steps[-1].optim
    cifar = make_config({}, {"method": "ekg", "train_path": "/tmp/x"}).steps[-1].optim
    assert (imagenet.weight_decay, imagenet.batch_size, imagenet.learning_rate) == (1e-4, 256, 0.01)
    assert (cifar.weight_decay, cifar.batch_size, cifar.learning_rate) == (5e-4, 128, 0.01)
    scratch = make_config({}, {"dataset": "imagenet", "train_path": "/tmp/x"}).steps[-1].optim
    assert (scratch.learning_rate, scratch.train_epoch) == (0.1, 90)


def test_every_method_declares_options_that_become_flags_and_round_trip_through_config_json(tmp_path):
    for name in method_names():
        cls = get_method(name)
        assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen, name
        for field in dataclasses.fields(cls.Options):
            assert field.metadata.get("help"), f"--{field.name} of --method {name} has no help text"
    cfg = make_config({}, {"method": "l1,kd", "train_path": str(tmp_path / "run"), "kd_temperature": 2.0,
                           "search_target_rate": 0.5})
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert load_config(str(path)) == cfg
    assert [s.name for s in cfg.steps] == ["0-baseline", "1-l1", "2-kd"]
    assert cfg.steps[2].options.kd_temperature == 2.0 and cfg.steps[1].options.search_target_rate == 0.5


def test_help_lists_every_option_under_its_method(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], SCRIPT)
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("options of ")]
    for name in method_names():
        if dataclasses.fields(get_method(name).Options):
            assert any(f"--method {name}," in t or t.endswith(f"--method {name}:") for t in titles), name
        for field in dataclasses.fields(get_method(name).Options):
            assert f"--{field.name} " in out


@pytest.mark.parametrize("flags, message", [
    (["--train_epoch", "0"], "--train_epoch must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be positive"),
    (["--batch_size", "10", "--num_replicas", "4"], "--batch_size 10 must be a multiple of --num_replicas x --accum"),
    (["--decay_points", "0.6", "0.3"], "--decay_points must be increasing fractions"),
    (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
    (["--method", "l1", "--search_target_rate", "1"], r"--search_target_rate must be in \(0, 1\)"),
    (["--method", "ekg", "--search_step", "0"], r"--search_step must be in \(0, 1\]"),
    (["--method", "kd", "--teacher_param", "/nonexistent.pkl"], "--teacher_param /nonexistent.pkl does not exist"),
    (["--method", "kd", "--trained_param", __file__, "--kd_temperature", "0"], "--kd_temperature must be positive"),
    (["--method", "kd", "--trained_param", __file__, "--kd_convention", "x"], "--kd_convention must be one of"),
    (["--method", "kd"], "--method kd as the first step needs --teacher_param"),
    (["--schedule", "linear"], "--schedule must be one of step, cosine, constant"),
    (["--trained_param", "/nonexistent/params.pkl"], "--trained_param /nonexistent/params.pkl does not exist"),
    (["--method", "ekg", "--resrep_lambda", "0.1"], "--resrep_lambda is an option of --method resrep, which this run"),
    (["--method", "ekg,magic"], "unknown --method 'magic'"),
    (["--image_size", "64"], "--image_size applies to --dataset imagenet or mnist, not cifar10"),
    (["--dataset", "mnist", "--image_size", "7"], "--image_size must be at least 8, got 7"),
])
def test_bad_values_are_one_line_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(flags, SCRIPT)
    assert "\n" not in str(err.value)


def test_image_size_is_imagenets_crop_and_mnists_resize():
    assert dataset_options("mnist", 32) == {"image_size": 32}
    assert dataset_options("ImageNet", 64) == {"image_size": 64, "resize_size": 73}
    assert dataset_options("cifar10", None) == {}
    for dataset in ("cifar10", "cifar100"):
        with pytest.raises(ConfigError, match=f"--image_size applies to --dataset imagenet or mnist, not {dataset}"):
            dataset_options(dataset, 32)
    with pytest.raises(ConfigError, match="--image_size must be at least 8"):
        dataset_options("imagenet", 4)
    cfg = parse_config(["--dataset", "mnist", "--arch", "LeNet-5-32", "--image_size", "32"], SCRIPT)
    assert cfg.run.image_size == 32


def test_a_steps_list_must_agree_with_the_method_flag(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": [{"method": "l1"}, {"method": "kd", "bogus": 1}]}))
    with pytest.raises(ConfigError, match="step 2 \\(kd\\) has no field 'bogus'"):
        parse_config(["--config", str(path)], SCRIPT)
    with pytest.raises(ConfigError, match="--method ekg differs from the steps of"):
        parse_config(["--config", str(path), "--method", "ekg"], SCRIPT)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),  # missing
    (b'{"seed": 1,', "not valid JSON"),
    (b'{"train_path": "runs/\xe9t\xe9"}', "not UTF-8 text"),  # Latin-1
    (b'[["seed", 1]]', "expected a JSON object"),
    (b"3", "expected a JSON object"),
    (b'{"sed": 1}', "unknown field 'sed'"),
])
def test_a_bad_config_file_is_a_one_line_config_error(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--config", str(path)], SCRIPT)
    assert str(err.value).startswith(f"--config {path}") and "\n" not in str(err.value)
    # The scripts print it as one line and exit with code 2, before anything is built.
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(["--config", str(path), "--train_path", str(tmp_path / "run")])
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {err.value}\n"
    assert not (tmp_path / "run").exists()


def test_run_control_options_are_not_compared_on_resume():
    a = make_config({}, {"method": "ekg", "train_path": "/tmp/a", "search_cache_mb": 64})
    b = make_config({}, {"method": "ekg", "train_path": "/tmp/b", "resume": True, "recompute": True})
    assert a.comparable() == b.comparable()
    assert isinstance(a, Config) and isinstance(a.run, RunConfig)


def test_the_export_formats_a_run_accepts_are_the_exporters():
    from codebase import export
    from codebase.config import EXPORT_FORMATS

    assert tuple(EXPORT_FORMATS) == tuple(export.FORMATS)
    with pytest.raises(ConfigError, match="--export 'onnx' is not a format"):
        parse_config(["--export", "onnx"], SCRIPT)
