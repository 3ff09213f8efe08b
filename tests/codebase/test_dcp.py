"""`dcp`: the greedy rule, the stage split, one greedy step against a hand-computed gradient, the
kernel rows it keeps, bad options, and a pruning resumed in the middle of a group's choice."""

import json

import numpy as np
import pytest
import tensorflow as tf

import nets
import train_cifar
from codebase.channel_stats import problems
from codebase.dcp_tasks import AuxHead, ChannelChoice, next_channels
from codebase.methods.dcp import DCPOptions, stage_plan
from op_utils.optim import Adam
from op_utils.trainer import Trainer
from tests.support.nets import randomise
from tests.support.runs import Crash, assert_same_params, resnet8_start, training_steps
from utils.errors import ConfigError


def test_next_channels_takes_the_largest_norms_among_those_not_chosen():
    norms = np.array([0.5, 3.0, 0.0, 2.0, 1.0])
    assert next_channels(norms, np.zeros(5), 1).tolist() == [1]
    assert next_channels(norms, np.array([0, 1, 0, 0, 0]), 2).tolist() == [3, 4]  # ascending
    # A zero gradient can still be chosen (PocketFlow's + 1e-8), a chosen channel never.
    assert next_channels(norms, np.array([1, 1, 0, 1, 1]), 1).tolist() == [2]
    with pytest.raises(ValueError, match="1 are left"):
        next_channels(norms, np.array([1, 1, 0, 1, 1]), 2)


def test_the_convs_split_evenly_into_stages_with_a_head_after_each_but_the_last():
    net = nets.build("ResNet-20", masked=True)
    heads, stage_of = stage_plan(net, 3)
    convs = list(stage_of)
    assert len(convs) == 21 and convs[0] == "conv"  # ResNet-20 (option B): 1 + 18 + 2 projections
    per = 6  # ceil(22 / 4)
    assert heads == [convs[5], convs[11], convs[17]]
    assert [stage_of[k] for k in convs] == [i // per for i in range(21)]
    assert len(stage_plan(net, 1)[0]) == 1


def _choice(keep=2, chunk=1, layer_steps=2):
    net = nets.build("ResNet-8", masked=True)
    randomise(net, seed=1)
    full = nets.build("ResNet-8", masked=False)
    full.set_params(net.get_params())
    problem = next(p for p in problems(net, streams=False) if p.group == "BasicBlock1.0/conv1")
    head = AuxHead(net.layers["BasicBlock1.0/conv2"].out_group.size, 10, seed=0)
    task = ChannelChoice(net, full, problem.convs, keep, head, "BasicBlock1.0/conv2:out", chunk, layer_steps,
                         "sum", rec_weight=4.0)
    trainer = Trainer(tf.distribute.get_strategy(), task, Adam(1e-2), global_batch_size=4)
    return net, task, trainer


def _batch(seed):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(4, 32, 32, 3)), tf.float32), tf.constant(rng.integers(0, 10, 4), tf.int32))


def test_a_greedy_step_chooses_the_channel_whose_kernel_rows_have_the_largest_gradient():
    net, task, trainer = _choice()
    (kernel_key,) = task.convs
    kernel = net.layers[kernel_key].kernel
    # The first step, by hand: the loss's gradient with respect to the reading kernel, at the start.
    before = kernel.numpy()
    batch = _batch(0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(task.loss(batch, True).per_example) / 4.0
    norms = np.sum(tape.gradient(loss, kernel).numpy() ** 2, axis=(0, 1, 3))
    assert norms.min() > 0 and np.argmax(norms) != 0  # a real choice
    trainer.train_step(batch)
    np.testing.assert_allclose(task.state.norms.numpy(), norms, rtol=1e-4)
    np.testing.assert_array_equal(kernel.numpy(), before)  # step 1 updates nothing
    task.after_step(1)
    assert task.chosen().tolist() == [int(np.argmax(norms))]
    # Only the chosen input rows are left, and only they train.
    rows = np.zeros(before.shape[2], bool)
    rows[task.chosen()] = True
    np.testing.assert_array_equal(kernel.numpy()[:, :, ~rows], 0.0)
    np.testing.assert_array_equal(kernel.numpy()[:, :, rows], before[:, :, rows])
    others = {k: v.numpy() for k, v in net.param_vars().items() if k != f"{kernel_key}/kernel:0" and "moving" not in k}
    trainer.train_step(_batch(1))
    assert task.after_step(2) is False and len(task.chosen()) == 1  # not a choice step (layer_steps 2)
    np.testing.assert_array_equal(kernel.numpy()[:, :, ~rows], 0.0)
    assert not np.allclose(kernel.numpy()[:, :, rows], before[:, :, rows])
    for key, value in others.items():
        np.testing.assert_array_equal(net.param_vars()[key].numpy(), value, err_msg=key)
    trainer.train_step(_batch(2))
    task.after_step(3)  # the second choice, from the third step's gradient
    assert len(task.chosen()) == 2 and task.total_steps == 4 and task.choice_steps == (1, 3)


def test_chunks_add_several_channels_per_choice_and_the_last_chunk_fills_the_count():
    net, task, trainer = _choice(keep=5, chunk=2, layer_steps=1)
    assert task.choice_steps == (1, 2, 3) and task.total_steps == 3
    for step in (1, 2, 3):
        trainer.train_step(_batch(step))
        task.after_step(step)
        assert len(task.chosen()) == min(2 * step, 5)


@pytest.mark.parametrize("flags, message", [
    ({"dcp_chunk": 0}, "--dcp_chunk must be positive, got 0"),
    ({"dcp_layer_steps": 0}, "--dcp_layer_steps must be positive, got 0"),
    ({"dcp_block_steps": -1}, "--dcp_block_steps must be >= 0, got -1"),
    ({"cp_preserve_ratio": 1.5}, r"--cp_preserve_ratio must be in \(0, 1\], got 1.5"),
])
def test_bad_options_are_one_line_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        DCPOptions(**flags).validate()


def _args(start, run, *extra):
    return [*start, "--train_path", str(run),
            "--cp_protocol", "uniform", "--cp_preserve_ratio", "0.25", "--dcp_stages", "1", "--dcp_block_steps", "1",
            "--dcp_layer_steps", "2", "--dcp_chunk", "4", *extra]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    start = resnet8_start(root, "dcp")
    with training_steps() as steps:
        results = train_cifar.main(_args(start, root / "whole"))
    return root, start, results, steps


def test_every_group_is_chosen_in_its_stage_in_order(whole):
    root, _, results, steps = whole
    step = root / "whole" / "1-dcp"
    info = json.loads((step / "prune_results.json").read_text())
    # ResNet-8 has 9 convs: 2 stages of 5 (ceil(10 / 2)), a head after the 5th (the 2nd stage's first conv).
    assert info["heads"] == ["BasicBlock1.0/conv1"]
    assert [(g["group"], g["kept"], g["stage"]) for g in info["groups"]] == [
        ("BasicBlock0.0/conv1", 4, 0), ("BasicBlock1.0/conv1", 8, 1), ("BasicBlock2.0/conv1", 16, 1)]
    assert results["widths"] == {"BasicBlock0.0/conv1": 4, "BasicBlock1.0/conv1": 8, "BasicBlock2.0/conv1": 16,
                                 "stem": 16, "stage1": 32, "stage2": 64}
    # Trainings, in order: stage 0's block-wise fine-tuning (1 step), its group's choice (1 choice of 4
    # channels, 2 steps), stage 1's fine-tuning, its two groups' choices (2 and 4 choices), then the fine-tuning.
    # (The smoke run in test_methods chooses over 2 replicas, without block-wise fine-tuning.)
    assert steps == [1, *range(1, 3), 1, *range(1, 5), *range(1, 9), 1]
    assert sorted(p.name for p in step.iterdir() if p.is_dir()) == [
        "choose_BasicBlock0.0_conv1", "choose_BasicBlock1.0_conv1", "choose_BasicBlock2.0_conv1", "finetune",
        "stage0", "stage1"]


def test_a_pruning_resumed_in_the_middle_of_a_choice_ends_where_an_uninterrupted_one_ends(whole):
    root, start, results, _ = whole
    run = root / "resumed"
    with pytest.raises(Crash), training_steps(crash_at=5):  # the 5th step of the last group's choice (2 choices)
        train_cifar.main(_args(start, run))
    with training_steps() as steps:
        resumed = train_cifar.main(_args(start, run, "--resume"))
    assert steps == [5, 6, 7, 8, 1]  # only what was left
    assert resumed["widths"] == results["widths"]
    assert_same_params(run / "trained_params.pkl", root / "whole" / "trained_params.pkl")
