"""ResRep: the Res update against hand computations, mask updates, resume, the conversion (lossless and
lossy). Its scripted run is in tests/codebase/test_methods.py."""

import types

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.budget import FlopsBudget
from codebase.config import make_config
from codebase.methods.resrep import (LOSSLESS_NORM, MaskSchedule, compactor_overrides, convert_net, res_gradients,
                                     select_closed)
from nets.base import Net
from nets.compactor import Compactor
from nets.groups import ChannelGroup
from op_utils.loop import fit
from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.task import softmax_cross_entropy
from op_utils.task import Classify
from op_utils.trainer import Trainer
from tests.support.nets import randomise
from tests.support.toy import make_train_data_fn, toy_images
from utils.errors import ConfigError


def test_res_gradient_matches_hand_computation():
    rng = np.random.default_rng(0)
    compactor = Compactor(ChannelGroup("g", 3, masked=False))
    kernel = rng.normal(size=(3, 3)).astype(np.float32)
    compactor.kernel.assign(kernel[None, None])
    compactor.mask.assign([1.0, 0.0, 1.0])
    x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    w = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(w * compactor(x))
    grad = compactor.res_gradient(tape.gradient(loss, compactor.kernel), 0.1).numpy()[0, 0]
    # dL/dK[j, c] = sum over positions of x_j w_c; row c is column c of K.
    task = np.einsum("nhwj,nhwc->jc", x, w)
    want = task * np.array([1.0, 0.0, 1.0]) + 0.1 * kernel / np.linalg.norm(kernel, axis=0)
    np.testing.assert_allclose(grad, want, rtol=1e-5)


class TinyNet(Net):
    """conv - BN - ReLU - mean - dense: one compactor, quick to trace."""

    def __init__(self, arch="Tiny", widths=None, masked=False):
        super().__init__(arch, {}, widths, masked)
        image, hidden = self.group("input", 3, prunable=False), self.group("a", 6)
        self.conv1 = self.conv("conv1", image, hidden, 3, (6, 6))
        self.bn1 = self.bn("bn1", hidden, self.conv1.out_hw)
        self.head = self.fc("fc", hidden, self.group("logits", 5, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        return self.head(tf.reduce_mean(tf.nn.relu(self.bn1(self.conv1(x), training)), [1, 2]))


def test_trainer_step_applies_res_update_with_compactor_momentum_on_two_replicas():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        net = TinyNet()
        randomise(net)
        net.add_compactors()
    compactor = net.compactors["a"]
    compactor.kernel.assign(compactor.kernel + 0.1)
    compactor.mask.assign([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # closed rows: no task gradient
    local = TinyNet()
    local.add_compactors()
    local.set_params(net.get_params())
    local.load_transform_state(net.transform_state())  # the compactors' kernels and masks
    x, y = toy_images(8)

    # Each replica normalises its half of the batch; the step uses the sum of their gradients.
    variables = [local.compactors["a"].kernel, local.head.kernel]
    task = [np.zeros(v.shape, np.float32) for v in variables]
    for half in (slice(0, 4), slice(4, 8)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(softmax_cross_entropy(local, (x[half], y[half]), True)[0]) / 8.0
        task = [t + g.numpy() for t, g in zip(task, tape.gradient(loss, variables))]
    before = [v.numpy() for v in variables]

    lr, wd, lam = 0.1, 0.01, 0.05
    optimizer = SGD(lr, momentum=0.9, weight_decay=wd, overrides=compactor_overrides(net, 0.99))
    trainer = Trainer(strategy, Classify(net, grad_transform=res_gradients(net, lam)), optimizer, global_batch_size=8)
    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)))))
    trainer.train_step(batch)

    # First Nesterov step from zero velocity: w <- w - lr * g * (1 + momentum).
    k0, mask = before[0], compactor.mask.numpy()
    res = task[0] * mask + lam * k0 / np.linalg.norm(k0.reshape(-1, 6), axis=0)
    np.testing.assert_allclose(compactor.kernel.numpy(), k0 - lr * res * 1.99, atol=1e-6)
    np.testing.assert_allclose(net.head.kernel.numpy(), before[1] - lr * (task[1] + wd * before[1]) * 1.9,
                               atol=1e-6)


class LinearFlops:
    """FLOPs = sum of cost[k] * width[k]: each channel of group k costs cost[k]."""

    def __init__(self, cost):
        self.cost = cost

    def total(self, widths):
        return sum(self.cost[k] * w for k, w in widths.items())

    def saving(self, widths, key):
        return self.cost[key]


def test_select_closed_follows_norm_order_to_the_target():
    norms = {"a": np.array([0.5, 0.1, 0.9, 0.3]), "b": np.array([0.2, 0.8, 0.05, 0.6])}
    full = {"a": 4, "b": 4, "fixed": 2}
    flops = LinearFlops({"a": 1, "b": 2, "fixed": 4})  # total 20
    # Already at the target (nothing to cap): close by ascending norm until FLOPs <= 0.6 * 20.
    current = {"a": 2, "b": 2, "fixed": 2}  # 14 > 12: still above target, cap = 4 closed + 4
    closed = select_closed(norms, full, current, flops, target=0.6, granularity=4)
    # Order: b2 (0.05, -2), a1 (0.1, -1), b0 (0.2, -2), a3 (0.3, -1) -> 20-6 = 14, then a0 -> 13, b3 -> 11.
    assert closed == {"a": [1, 3, 0], "b": [2, 0, 3]}


def test_select_closed_granularity_cap_and_at_least_one_channel():
    norms = {"a": np.array([0.01, 0.02, 0.03]), "b": np.array([0.5, 0.6])}
    full = {"a": 3, "b": 2}
    flops = LinearFlops({"a": 1, "b": 1})
    # From full widths, far above target: at most 0 + 2 rows are closed.
    assert select_closed(norms, full, full, flops, target=0.1, granularity=2) == {"a": [0, 1], "b": []}
    # With a generous cap, "a" keeps one row (its largest norm) and "b" one too.
    closed = select_closed(norms, full, {"a": 1, "b": 2}, flops, target=0.1, granularity=10)
    assert closed == {"a": [0, 1], "b": [0]}
    # At or below target now: no cap, and closing stops as soon as the target is met.
    assert select_closed(norms, full, {"a": 1, "b": 1}, flops, target=0.8, granularity=1) == {"a": [0], "b": []}


def test_flops_budget_matches_the_net_cost_convention():
    net = nets.build("ResNet-20", masked=False)
    flops = FlopsBudget(net)
    widths = {k: g.size - 3 for k, g in net.prunable_groups().items()}
    assert flops.total(widths) == net.cost(widths).ekg_flops
    for key in ("stem", "stage1", "BasicBlock2.1/conv1"):
        fewer = {**widths, key: widths[key] - 1}
        assert flops.saving(widths, key) == net.cost(widths).ekg_flops - net.cost(fewer).ekg_flops


def test_mask_schedule_updates_after_the_lasso_only_steps_every_interval():
    net = nets.build("ResNet-20", masked=False, input_size=8)
    net.add_compactors()
    schedule = MaskSchedule(net, target=0.5, interval=3, before=4, granularity=4)
    updates = []
    update = schedule.update
    schedule.update = lambda step: (updates.append(step), update(step))
    stats = [schedule(step) for step in range(1, 14)]
    assert updates == [7, 10, 13]
    assert stats[-1]["closed_channels"] == 12 and stats[0]["closed_channels"] == 0
    assert stats[-1]["flops_kept"] < 1.0 and set(stats[-1]) == {
        "flops_kept", "closed_channels", "compactor_norm_open", "compactor_norm_closed"}


class ConvertContext:
    """What the conversion uses of a RunContext, for `TinyNet`: nets copied from their class and
    spec, training batches, and an evaluation that keeps every net it evaluated with its logits."""

    def __init__(self, images, labels, batches):
        self.images, self.labels = images, labels
        self.data = types.SimpleNamespace(train_eval=lambda batch_size: batches)
        self.evaluated = []

    def copy_net(self, net):
        new = TinyNet(widths=net.widths())
        if net.compactors:
            new.add_compactors(list(net.compactors))
        new.set_params(net.get_params())
        new.load_transform_state(net.transform_state())
        return new

    def evaluate(self, net):
        logits = net(self.images, training=False).numpy()
        self.evaluated.append((net, logits))
        return {"top1": top1(logits, self.labels)}


def top1(logits, labels):
    return float(np.mean(np.argmax(logits, -1) == labels))


def convert(closed_rows_scale):
    """`convert_net` of a TinyNet whose compactor mixes channels (not the identity) and whose
    rows 1 and 4 are closed, scaled by `closed_rows_scale`; returns the compactor net, the
    context, what the conversion reports and the slimmed net it made."""
    rng = np.random.default_rng(5)
    net = TinyNet()
    randomise(net, seed=2)
    net.add_compactors()
    kernel = np.eye(6) + rng.normal(0, 0.4, size=(6, 6))
    kernel[:, [1, 4]] *= closed_rows_scale  # row c of the compactor is kernel[:, c]
    net.compactors["a"].kernel.assign(kernel[None, None].astype(np.float32))
    net.compactors["a"].mask.assign([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    images = rng.normal(size=(64, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 64)
    batches = [(images[i:i + 16], labels[i:i + 16], np.arange(i, i + 16)) for i in range(0, 64, 16)]
    ctx = ConvertContext(images, labels, batches)
    info = convert_net(ctx, net, 0.25, batch_size=8)
    small = info.pop("net")
    return net, ctx, info, small


def test_lossless_conversion_keeps_the_trained_statistics_and_the_outputs():
    net, ctx, pruned, saved = convert(closed_rows_scale=1e-7)
    assert pruned["bn_reestimated"] is False and pruned["closed_channels"] == 2 and pruned["widths"] == {"a": 4}
    assert pruned["closed_norm_max"] == pytest.approx(net.compactors["a"].row_norms()[[1, 4]].max())
    assert pruned["closed_norm_max"] < LOSSLESS_NORM
    # The slimmed net computes what the net with compactors computes: nothing is re-estimated.
    expected = net(ctx.images, training=False).numpy()
    [(evaluated, logits)] = ctx.evaluated
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert saved.widths() == {"a": 4} and not saved.compactors
    np.testing.assert_allclose(saved(ctx.images, training=False).numpy(), expected, atol=1e-5)
    assert pruned["folded_top1"] == pruned["before_finetune_top1"] == top1(expected, ctx.labels)
    assert pruned["resrep_top1"] == 0.25


def test_lossy_conversion_reports_the_folded_net_and_saves_it_with_re_estimated_statistics():
    net, ctx, pruned, saved = convert(closed_rows_scale=1.0)
    norms = net.compactors["a"].row_norms()
    assert pruned["bn_reestimated"] is True and pruned["closed_norm_max"] == pytest.approx(norms[[1, 4]].max())
    assert pruned["closed_norm_max"] > 0.5
    [(_, folded), (reestimated, logits)] = ctx.evaluated
    # The folded net is the compactor net with the closed rows zeroed (its BN statistics still the trained ones).
    zeroed = ctx.copy_net(net)
    kernel = zeroed.compactors["a"].kernel.numpy()
    kernel[..., [1, 4]] = 0.0
    zeroed.compactors["a"].kernel.assign(kernel)
    expected = zeroed(ctx.images, training=False).numpy()
    np.testing.assert_allclose(folded, expected, atol=1e-5)
    assert pruned["folded_top1"] == top1(expected, ctx.labels)
    # The saved net has the mean of the batch statistics of its BN's input over the training batches.
    outputs = [reestimated.conv1(x).numpy() for x, _, _ in ctx.data.train_eval(8)]
    bn = reestimated.bn1
    np.testing.assert_allclose(bn.moving_mean.numpy().ravel(), np.mean([h.mean((0, 1, 2)) for h in outputs], 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy().ravel(), np.mean([h.var((0, 1, 2)) for h in outputs], 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(saved(ctx.images, training=False).numpy(), logits, atol=1e-6)
    assert pruned["before_finetune_top1"] == top1(logits, ctx.labels) != pruned["folded_top1"]


def test_resrep_config_checks():
    # General checks and the precedence of presets, file and flags: test_config.py.
    flags = {"method": "resrep", "train_path": "/tmp/unused"}
    [baseline, step] = make_config({}, flags).steps
    assert (step.optim.train_epoch, step.optim.learning_rate, step.optim.schedule, step.options.resrep_target) == (
        0, 0.01, "cosine", 0.471)
    assert baseline.name == "0-baseline" and baseline.optim.learning_rate == 0.05  # the scratch recipe
    with pytest.raises(ConfigError, match="--optimizer sgd"):
        make_config({}, {**flags, "optimizer": "adam"})
    with pytest.raises(ConfigError, match="--resrep_target"):
        make_config({}, {**flags, "resrep_target": 1.5})


def test_masks_are_checkpointed_and_restored_on_resume(tmp_path):
    x, y = toy_images(24)

    def run(**kwargs):
        strategy = make_strategy(num_replicas=2)
        with strategy.scope():
            net = TinyNet()
            net.add_compactors()
        trainer = Trainer(strategy, Classify(net, grad_transform=res_gradients(net, 1e-4)),
                          SGD(0.01, overrides=compactor_overrides(net, 0.99)), global_batch_size=8)
        # Target 20% of the FLOPs: one of the 6 rows; each update closes at most 2 more than are closed.
        schedule = MaskSchedule(net, target=0.2, interval=1, before=1, granularity=2)
        fit(trainer, make_train_data_fn(x, y, 8, fail_at=kwargs.pop("fail_at", None)), epochs=1,
            steps_per_epoch=3, train_path=str(tmp_path), ckpt_every_steps=2, on_step_end=schedule, **kwargs)
        return net

    with pytest.raises(tf.errors.InvalidArgumentError, match="simulated crash"):
        run(fail_at=(0, 2))  # step 3 fails; the checkpoint of step 2 holds 2 closed rows
    net = run(resume=True)
    assert net.compactors["a"].mask.numpy().sum() == 6 - 4  # step 3 closed 2 more than the restored 2


def test_without_streams_only_the_groups_one_conv_writes_get_compactors():
    from codebase.methods.resrep import single_writer_groups

    net = nets.build("ResNet-20", masked=False)
    assert single_writer_groups(net) == [f"BasicBlock{i}.{j}/conv1" for i in range(3) for j in range(3)]
    assert list(net.add_compactors(single_writer_groups(net))) == single_writer_groups(net)
