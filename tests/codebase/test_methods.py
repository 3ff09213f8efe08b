"""Every method that is not a pruning method, end to end (`tests/support/smoke.py`); chains of
methods, resumed mid-step; `test.py` on any step's output; the quantized run's exported files.

Each method's run is made once (module-scoped) and shared by the tests that read its folder.
"""

import json

import pytest

import test as test_script
import train_cifar
from codebase.methods import method_names
from tests.support.runs import Crash, assert_same_params, training_steps
from tests.support.smoke import PRUNING, SMOKE, args_of, check_end_to_end, make_data, run_method


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(set(SMOKE) - set(PRUNING)))
def method_run(request, data, tmp_path_factory):
    return run_method(request.param, data, tmp_path_factory)


def test_every_registered_method_has_a_smoke_run():
    assert set(SMOKE) == set(method_names()), "add the new method's tiny options to SMOKE (tests/support/smoke.py)"
    assert set(PRUNING) <= set(SMOKE)


def test_every_method_runs_end_to_end(method_run, data, capsys):
    check_end_to_end(method_run, data, capsys)


# === Chains ===
@pytest.fixture(scope="module")
def chain(data, tmp_path_factory):
    """`--method l1,kd` uninterrupted: baseline, L1 pruning (no fine-tuning of its own), distillation."""
    run = tmp_path_factory.mktemp("chain") / "run"
    with training_steps() as steps:
        results = train_cifar.main(args_of("l1,kd", data, run, "--ckpt_every_steps", "1", "--train_epoch", "2",
                                           *SMOKE["l1"][1]))
    return run, results, steps


def test_a_chain_passes_each_step_the_previous_steps_net(chain, data, capsys):
    run, results, _ = chain
    assert json.loads((run / "stages.json").read_text()) == [
        "0-baseline/train", "0-baseline/test", "1-l1/prune", "1-l1/test", "2-kd/train", "2-kd/test"]
    assert list(results["steps"]) == ["0-baseline", "1-l1", "2-kd"]
    # L1 left the fine-tuning to the distillation, whose teacher is the unpruned baseline.
    assert not (run / "1-l1" / "finetune").exists()
    assert json.loads((run / "2-kd" / "teacher.json").read_text())["teacher"] == str(run / "0-baseline" / "trained_params.pkl")
    pruned = json.loads((run / "1-l1" / "trained_params.arch.json").read_text())["widths"]
    assert results["widths"] == pruned and results["steps"]["1-l1"]["widths"] == pruned
    # test.py evaluates any step's output, each with its own widths.
    for name in ("0-baseline", "1-l1", "2-kd"):
        capsys.readouterr()
        out = test_script.main([*data["LeNet-5"], "--trained_param", str(run / name / "trained_params.pkl"),
                                "--json", "--latency_runs", "1"])
        assert out["top1"] == pytest.approx(results["steps"][name]["top1"]), name


def test_a_chain_resumed_in_the_middle_of_its_second_step_ends_where_an_uninterrupted_one_ends(chain, data,
                                                                                                  tmp_path):
    whole, whole_results, whole_steps = chain
    run = tmp_path / "run"
    args = args_of("l1,kd", data, run, "--ckpt_every_steps", "1", "--train_epoch", "2", *SMOKE["l1"][1])
    # The baseline trains steps 1-2; the distillation's trainer counts its own steps: it dies before its 3rd.
    with training_steps(crash_at=3), pytest.raises(Crash):
        train_cifar.main(args)
    assert json.loads((run / "stages.json").read_text()) == ["0-baseline/train", "0-baseline/test", "1-l1/prune",
                                                             "1-l1/test"]
    with training_steps() as resumed:
        results = train_cifar.main(args + ["--resume"])
    assert resumed == [3, 4]  # only the distillation's remaining steps ran
    assert_same_params(run / "trained_params.pkl", whole / "trained_params.pkl")
    assert results["top1"] == whole_results["top1"] and results["loss"] == pytest.approx(whole_results["loss"])
    assert whole_steps == [1, 2, 1, 2, 3, 4]  # baseline, then distillation; L1 trains nothing


def test_a_quantized_net_evaluates_as_its_exported_files_compute(method_run):
    method, run, results = method_run
    if method != "uq":
        pytest.skip("the uq run exports its net (--export)")
    report = json.loads((run / "1-uq" / "export" / "export.json").read_text())
    assert set(report["formats"]) == {"tflite_fp32", "saved_model"}
    for fmt, entry in report["formats"].items():
        assert entry["eval"]["top1"] == results["top1"] == entry["eval"]["tf_top1"], fmt
        assert entry["eval"]["argmax_agreement"] == 1.0 and entry["eval"]["max_abs_logit_diff"] < 1e-4, fmt
    packed = json.loads((run / "1-uq" / "results.json").read_text())
    assert packed["packed_bytes"] < packed["float_bytes"] / 3
