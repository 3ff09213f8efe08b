"""The shunt procedure's pieces: the stratified split, block removal for knowledge quotients, the run
placement, and the shunt's feature-map regression."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase import shunt_tasks
from nets import shunt
from op_utils.optim import Adam
from tests.support.nets import randomise
from utils.errors import ConfigError

X = tf.random.stateless_normal([4, 32, 32, 3], seed=[3, 4])


def test_the_split_takes_the_same_fraction_of_every_class_disjointly_and_reproducibly():
    labels = np.repeat(np.arange(4), [10, 20, 30, 5])
    train, val = shunt_tasks.stratified_split(labels, 0.2, seed=7)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 6, 1]
    again = shunt_tasks.stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(again[1], val) and not np.array_equal(shunt_tasks.stratified_split(labels, 0.2, 8)[1], val)


def test_removing_a_block_makes_its_output_its_input_and_touches_no_weight_nor_the_blocks_before_it():
    net = nets.build("ResNet-20", masked=False)
    randomise(net, seed=5)
    before = net.get_params()
    names = [b.name for b in net.block_table if b.residual]
    model = shunt_tasks.SkipBlocks(net, names)
    np.testing.assert_allclose(model(X).numpy(), net(X).numpy(), rtol=1e-6, atol=1e-6)

    removed = "BasicBlock1.1"
    model.skip.assign(tf.one_hot(names.index(removed), len(names)))
    seen = {}
    inner = model.net

    class Recording:  # records the block outputs after SkipBlocks' tap has replaced them
        arch = inner.arch

        def __call__(self, x, training=False, tap=None):
            def both(site, y):
                y = tap(site, y)
                if site.kind == "block":
                    seen[site.name] = y
                return y
            return inner(x, training=training, tap=both)

    model.net = Recording()
    logits = model(X)
    reference = {}
    net(X, tap=lambda site, y: reference.setdefault(site.name, y) if site.kind == "block" else y)
    np.testing.assert_array_equal(seen[removed].numpy(), seen["BasicBlock1.0"].numpy())  # output = input
    for name in ("stem", "BasicBlock0.0", "BasicBlock1.0"):  # the blocks before it are untouched
        np.testing.assert_allclose(seen[name].numpy(), reference[name].numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits.numpy(), net(X).numpy())
    for key, value in net.get_params().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_the_knowledge_quotient_of_a_block_is_one_minus_the_accuracy_ratio_without_it():
    net = nets.build("ResNet-8", masked=False)
    randomise(net, seed=1)
    images = tf.random.stateless_normal([16, 32, 32, 3], seed=[5, 6])
    labels = tf.argmax(net(images), axis=1, output_type=tf.int32)  # the net is right on every image
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    table = shunt_tasks.knowledge_quotients(tf.distribute.get_strategy(), net, data)
    assert table["original"] == 1.0
    (name, entry), = table["blocks"].items()  # ResNet-8's only residual block
    assert name == "BasicBlock0.0"
    model = shunt_tasks.SkipBlocks(net, [name])
    model.skip.assign([1.0])
    without = float(np.mean(np.argmax(model(images).numpy(), 1) == labels.numpy()))
    assert entry["top1"] == pytest.approx(without) and entry["kq"] == pytest.approx(1 - without)


def test_the_placement_takes_the_lowest_quotient_run_that_reaches_the_cut():
    net = nets.build("ResNet-20", masked=False)
    names = [b.name for b in net.block_table if b.residual]
    kq = {name: {"kq": 0.5, "top1": 0.0} for name in names}
    for name in ("BasicBlock2.1", "BasicBlock2.2"):
        kq[name]["kq"] = 0.0
    # One stage-2 block is about 11% of ResNet-20's FLOPs: 15% takes two, and the two free ones win.
    chosen = shunt_tasks.choose_run(net, {"blocks": kq}, 0.15, arch=4, expand=16, bottleneck=8)
    assert (chosen["first"], chosen["last"]) == ("BasicBlock2.1", "BasicBlock2.2") and chosen["score"] == 0.0
    assert chosen["flops_cut"] >= 0.15
    single = shunt_tasks.choose_run(net, {"blocks": kq}, 0.05, arch=4, expand=16, bottleneck=8)
    assert (single["first"], single["last"]) == ("BasicBlock2.1", "BasicBlock2.1")  # the shorter of equal scores
    with pytest.raises(ConfigError, match="no contiguous run of blocks whose shunt"):
        shunt_tasks.choose_run(net, {"blocks": kq}, 0.99, arch=4, expand=16, bottleneck=8)


def test_feature_regression_trains_only_the_shunt_and_lowers_its_loss():
    original = nets.build("ResNet-8", masked=False)
    randomise(original, seed=2)
    shunted = nets.build("ResNet-8", masked=False, shunts=[shunt.entry("BasicBlock0.0", "BasicBlock0.0", 4, 16)])
    shunted.set_params({**shunted.get_params(), **{k: v for k, v in original.get_params().items()
                                                   if k in shunted.param_shapes()}})
    replaced, = shunted.shunt_list
    task = shunt_tasks.ShuntRegress(original, shunted, replaced, "stem", "BasicBlock0.0")
    assert {v.ref() for v in task.variables_to_train()} == {
        v.ref() for layer in replaced.layers.values() for v in layer.trainable_variables}
    frozen = original.get_params()
    optimizer = Adam(0.05)
    optimizer.build(task.variables_to_train())
    losses = []
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(task.loss((X, tf.zeros([4], tf.int32)), training=True).per_example)
        grads = tape.gradient(loss, task.variables_to_train())
        optimizer.apply(zip(grads, task.variables_to_train()))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    for key, value in original.get_params().items():
        np.testing.assert_array_equal(value, frozen[key], err_msg=key)
