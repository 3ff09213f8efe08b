"""`--method shunt` end to end on tiny data: every stage's artefacts, a run resumed in the middle of the
shunt's training, the chain onto channel pruning, and bad placements refused before any training."""

import json
import re

import pytest

import train_cifar
from codebase.artifacts import load_net
from tests.support.runs import Crash, assert_same_params, error_lines, resnet8_start, training_steps

pytestmark = pytest.mark.slow  # one module-scoped run of the whole procedure, shared

SHUNT = ["--shunt_blocks", "BasicBlock0.0:BasicBlock1.0", "--shunt_expand", "16", "--shunt_bottleneck", "8",
         "--shunt_epochs", "2", "--shunt_batch_size", "8", "--shunt_latency_batch", "4", "--shunt_latency_runs", "2",
         "--val_batch_size", "16", "--steps_per_epoch", "2", "--shunt_kd_weight", "4"]
L1 = ["--search_target_rate", "0.8", "--search_batch_size", "8"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("shunt")
    start = resnet8_start(root, "shunt")
    cut = start.index("--search_batch_size")
    start = start[:cut] + start[cut + 2:]  # shunt has no search
    # Shunts in a slimmed net (L1 first), the shunted net pruned again.
    chain = [a if a != "shunt" else "l1,shunt,l1" for a in start]
    with training_steps() as steps:
        results = train_cifar.main([*chain, "--train_path", str(root / "whole"), *SHUNT, *L1])
    return root, start, results, steps


def test_every_stage_leaves_its_artefacts_and_the_summary_compares_the_three_nets(whole):
    root, _, chained, steps = whole
    results = chained["steps"]["2-shunt"]
    step = root / "whole" / "2-shunt"
    split = json.loads((step / "split.json").read_text())
    assert sorted(split["val"] + split["train"]) == list(range(40)) and not set(split["val"]) & set(split["train"])
    quotients = json.loads((step / "knowledge_quotients.json").read_text())
    assert list(quotients["blocks"]) == ["BasicBlock0.0"]  # ResNet-8's only residual block
    placed = json.loads((step / "shunt.json").read_text())
    assert placed["shunts"] == [{"first": "BasicBlock0.0", "last": "BasicBlock1.0", "arch": 1, "expand": 16,
                                 "bottleneck": 8}]
    # L1's fine-tuning (1 epoch of 2 steps); the shunt: 2 epochs of 2 steps on the training split; the final
    # training: 1 epoch of 2 steps; the second L1's fine-tuning.
    assert steps == [1, 2, 1, 2, 3, 4, 1, 2, 1, 2]
    net = load_net("ResNet-8", str(step / "trained_params.pkl"))
    assert net.config["shunts"][0]["last"] == "BasicBlock1.0" and "BasicBlock0.0/conv1" not in net.groups
    pruned = load_net("ResNet-8", str(root / "whole" / "1-l1" / "trained_params.pkl")).widths()
    assert net.widths()["BasicBlock2.0/conv1"] == pruned["BasicBlock2.0/conv1"] < 64  # L1's widths kept
    assert set(results["nets"]) == {"original", "shunt_inserted", "final"}
    assert results["nets"]["final"]["ekg_flops"] == net.cost().ekg_flops
    assert results["flops_cut"] == pytest.approx(1 - net.cost().ekg_flops / results["nets"]["original"]["ekg_flops"])
    latency = json.loads((step / "latency.json").read_text())
    assert set(latency["original"]) == {"batch_1_ms", "batch_4_ms"} and latency["final"]["batch_1_ms"] > 0
    best = json.loads((step / "train_final" / "best.pkl.json").read_text())
    assert 0 <= best["epoch"] < 1


def test_a_run_resumed_in_the_middle_of_the_shunt_training_ends_where_an_uninterrupted_one_ends(whole):
    root, start, _, _ = whole
    run = root / "resumed"
    flags = [*[a if a != "shunt" else "l1,shunt" for a in start], "--train_path", str(run), *SHUNT, *L1]
    with pytest.raises(Crash), training_steps(crash_at=4):  # in the shunt's second epoch
        train_cifar.main(flags)
    with training_steps() as steps:
        train_cifar.main([*flags, "--resume"])
    assert steps == [3, 4, 1, 2]  # from the checkpoint at the end of its first epoch
    assert_same_params(run / "2-shunt" / "shunt_inserted.pkl", root / "whole" / "2-shunt" / "shunt_inserted.pkl")
    assert_same_params(run / "trained_params.pkl", root / "whole" / "2-shunt" / "trained_params.pkl")


def test_the_shunted_net_chains_onto_channel_pruning(whole):
    root, _, results, _ = whole
    net = load_net("ResNet-8", str(root / "whole" / "trained_params.pkl"))
    assert net.config["shunts"][0]["first"] == "BasicBlock0.0"
    assert results["ekg_flops"] < results["steps"]["2-shunt"]["ekg_flops"]
    assert any(net.widths()[k] < net.full_sizes[k] for k in net.widths() if k.startswith("shunt0/"))


@pytest.mark.parametrize("flags, message", [
    (["--shunt_blocks", "BasicBlock0.0:BasicBlock7.7"],
     "--shunt_blocks BasicBlock0.0:BasicBlock7.7: ResNet-8: shunt BasicBlock0.0..BasicBlock7.7 names no block "
     "'BasicBlock7.7' of the net"),
    (["--shunt_blocks", "BasicBlock2.0:BasicBlock0.0"], "is not a contiguous run of blocks"),
    (["--shunt_blocks", "BasicBlock0.0:BasicBlock2.0", "--shunt_arch", "4"], "halves the map 2 times; shunt arch 4"),
    (["--shunt_blocks", "BasicBlock0.0"], "each run is first:last"),
    (["--shunt_val_fraction", "1.5"], r"--shunt_val_fraction must be in \(0, 1\)"),
])
def test_bad_placements_are_refused_in_one_line_before_any_training(whole, flags, message, tmp_path, capsys):
    _, start, _, _ = whole
    with training_steps() as steps, pytest.raises(SystemExit):
        train_cifar.main([*start, "--train_path", str(tmp_path / "bad"), *SHUNT, *flags])
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert steps == [] and not (tmp_path / "bad" / "0-baseline").exists()
