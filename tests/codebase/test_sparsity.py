"""Weight sparsification: the schedule against its formula, per-layer protocols, masks taken from the
backup weights, pruned weights frozen, optimizer reset at each update, and bad options."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.config import parse_config
from codebase.methods.sparsity import Sparsify, WSOptions, attach_masks, layer_sparsities, maskable, schedule, \
    update_steps
from op_utils import loop
from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from tests.support.nets import input_for, randomise
from utils.errors import ConfigError

SCRIPT = dict(arch="LeNet-5", dataset="mnist", train_path="runs/x")


@pytest.mark.parametrize("step,expected", [(0, 0.0), (100, 0.0), (200, 0.75 - 0.75 * 0.75 ** 3),
                                           (300, 0.75 - 0.75 * 0.5 ** 3), (500, 0.75), (999, 0.75)])
def test_the_schedule_is_zhu_and_gupta_s_formula(step, expected):
    assert math.isclose(schedule(step, 1000, 0.75, 3.0, 0.1, 0.5), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_masks_are_updated_every_n_steps_inside_the_ramp_and_at_its_end():
    assert update_steps(1000, 150, 0.1, 0.5) == [100, 250, 400, 500]
    assert update_steps(10, 500, 0.1, 0.5) == [1, 5]


def test_heurist_sparsities_grow_with_log_params_and_average_to_the_target():
    net = nets.build("ResNet-8", masked=False, input_size=8)
    ratios = layer_sparsities(net, "heurist", 0.6)
    sizes = {k: int(np.prod(layer.kernel.shape)) for k, layer in maskable(net).items()}
    assert math.isclose(sum(ratios[k] * sizes[k] for k in sizes) / sum(sizes.values()), 0.6, rel_tol=1e-9)
    factors = {ratios[k] / math.log(sizes[k]) for k in sizes}
    assert max(factors) - min(factors) < 1e-12
    assert layer_sparsities(net, "uniform", 0.6) == dict.fromkeys(sizes, 0.6)


def test_a_ratio_list_names_every_layer_with_a_sparsity_in_range(tmp_path):
    net = nets.build("LeNet-5", masked=False)
    keys = list(maskable(net))
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps({k: 0.5 for k in keys}))
    assert layer_sparsities(net, "list", 0.75, str(path)) == dict.fromkeys(keys, 0.5)
    path.write_text(json.dumps({k: 0.5 for k in keys[1:]}))
    with pytest.raises(ConfigError, match=f"no sparsity for layer '{keys[0]}'"):
        layer_sparsities(net, "list", 0.75, str(path))
    path.write_text(json.dumps({**{k: 0.5 for k in keys}, keys[0]: 1.0}))
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\), got 1.0"):
        layer_sparsities(net, "list", 0.75, str(path))


@pytest.mark.parametrize("flags,message", [
    (["--ws_sparsity", "1.0"], r"--ws_sparsity must be in \[0, 1\), got 1.0"),
    (["--ws_sparsity", "-0.1"], r"--ws_sparsity must be in \[0, 1\)"),
    (["--ws_begin", "0.6"], "--ws_begin 0.6 must be before --ws_end 0.5"),
    (["--ws_protocol", "list"], "--ws_ratio_file goes with --ws_protocol list"),
    (["--ws_update_every", "0"], "--ws_update_every must be positive"),
])
def test_bad_ws_options_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--method", "ws", *flags], SCRIPT)
    assert "\n" not in str(err.value)


def test_ws_starts_from_the_trained_net_unless_asked_to_start_from_scratch():
    assert [s.method for s in parse_config(["--method", "ws"], SCRIPT).steps] == ["none", "ws"]
    scratch = parse_config(["--method", "ws", "--ws_from_scratch"], SCRIPT).steps
    assert [s.method for s in scratch] == ["ws"] and scratch[0].optim.learning_rate == 0.05  # the scratch recipe


def test_training_keeps_pruned_weights_frozen_takes_masks_from_the_backup_and_resets_the_optimizer(tmp_path):
    strategy = make_strategy(num_replicas=1)
    with strategy.scope():
        net = nets.build("ResNet-8", masked=False, input_size=8)
        randomise(net)
        masks = attach_masks(net)
    opts = WSOptions(ws_sparsity=0.6, ws_update_every=2, ws_begin=0.2, ws_end=0.8)
    total = 10
    task = Sparsify(net, masks, layer_sparsities(net, "uniform", 0.6), total, opts)
    from op_utils.trainer import Trainer

    trainer = Trainer(strategy, task, SGD(0.05, momentum=0.9, weight_decay=1e-3), global_batch_size=8)
    key = "BasicBlock1.0/conv1"
    kernel, mask = net.layers[key].kernel, masks[key].mask
    seen = []

    def on_step_end(step):
        slots = sum(float(tf.reduce_sum(tf.abs(s))) for slot in trainer.optimizer.slots for s in slot)
        seen.append((step, kernel.numpy().copy(), mask.numpy().copy(), slots))

    x = input_for(net, batch=8 * total)
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(8 * total) % 10)).batch(8, drop_remainder=True)
    loop.fit(trainer, lambda epoch, ctx: data, epochs=1, steps_per_epoch=total, train_path=str(tmp_path),
             on_step_end=on_step_end)
    updates = update_steps(total, 2, 0.2, 0.8)
    assert updates == [2, 4, 6, 8]
    for step, stored, chosen, slots in seen:
        if step in updates:
            assert slots == 0.0  # the optimizer was reset right after the mask update
            target = task.target(step)
            expected = np.ones(stored.size, np.float32)
            expected[np.argsort(np.abs(stored).reshape(-1), kind="stable")[: int(np.floor(target * stored.size))]] = 0
            np.testing.assert_array_equal(chosen.reshape(-1), expected)  # from the stored (backup) kernel
        else:
            assert slots > 0.0
    last_step, last_kernel, last_mask, _ = [s for s in seen if s[0] == updates[-1]][0]
    pruned = last_mask == 0
    assert pruned.mean() == pytest.approx(0.6, abs=1.0 / kernel.numpy().size)
    assert np.all(last_kernel[pruned] != 0)  # backups, not zeros
    np.testing.assert_array_equal(kernel.numpy()[pruned], last_kernel[pruned])  # frozen since (decay, momentum)
    assert np.any(kernel.numpy()[~pruned] != last_kernel[~pruned])  # the kept weights still train
    effective = net.layers[key].param("kernel").numpy()
    assert np.all(effective[pruned] == 0)
