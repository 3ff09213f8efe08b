"""The packed params file: reloads bit for bit into the weights the fake-quantized (or sparse) net
computes with, is smaller than the float file by the expected factor, and refuses a corrupt file."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.methods.quantization import activation_sites, quantized_layers
from codebase.methods.sparsity import attach_masks
from codebase.packed import load_packed, read_packed, save_packed
from nets.deploy import baked
from nets.quantizers import ActivationQuantizer, NonUniformQuantizer, UniformQuantizer
from tests.support.nets import input_for, randomise
from utils.errors import ParamsError


def _quantized(make, all_layers=True, activation_bits=None, seed=0):
    net = nets.build("ResNet-8", masked=False, input_size=8)
    randomise(net, seed=seed)
    for key in quantized_layers(net, all_layers):
        net.attach(make(), [f"{key}/kernel"])
    if activation_bits:
        for name in activation_sites(net):
            quantizer = net.attach(ActivationQuantizer(net.state, activation_bits), [name])
            quantizer.high.assign(2.0)
            quantizer.seen.assign(1.0)
    return net


CASES = {
    "uniform per tensor": lambda: _quantized(lambda: UniformQuantizer(4), activation_bits=8),
    "uniform channel": lambda: _quantized(lambda: UniformQuantizer(2, "channel"), all_layers=False),
    "uniform split": lambda: _quantized(lambda: UniformQuantizer(3, "split", bucket_size=64)),
    "nonuniform channel": lambda: _quantized(lambda: NonUniformQuantizer(2, "channel"), activation_bits=4),
    "nonuniform split": lambda: _quantized(lambda: NonUniformQuantizer(4, "split", bucket_size=128)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_packed_file_reloads_exactly_the_weights_the_quantized_net_uses(case, tmp_path):
    net = CASES[case]()
    path = str(tmp_path / "packed.npz")
    save_packed(net, path)
    loaded = load_packed(path)
    expected = baked(net)
    assert loaded.spec() == expected.spec()
    for key, value in expected.get_params().items():
        np.testing.assert_array_equal(loaded.get_params()[key], value, err_msg=key)
    x = input_for(net, batch=3)
    np.testing.assert_allclose(loaded(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)


def test_four_bit_kernels_take_an_eighth_of_their_float_bytes_plus_64_bits_a_bucket(tmp_path):
    net = _quantized(lambda: UniformQuantizer(4, "channel"))
    sizes = save_packed(net, str(tmp_path / "packed.npz"))
    kernels = [layer.kernel for key, layer in net.layers.items() if hasattr(layer, "kernel")]
    kernel_values = sum(int(np.prod(k.shape)) for k in kernels)
    buckets = sum(int(k.shape[-1]) for k in kernels)
    others = sum(int(np.prod(v.shape)) for v in net.param_vars().values()) - kernel_values
    expected = kernel_values // 2 + buckets * 8 + others * 4
    assert expected <= sizes["packed_bytes"] <= expected + 16_000  # npz and header overhead
    # ResNet-8's 78k params: 6.8x on the arrays, 5x with the header (its spec, one entry per array).
    assert sizes["float_bytes"] / expected > 6.5 and sizes["float_bytes"] / sizes["packed_bytes"] > 5.0
    assert sizes["packed_gzip_bytes"] <= sizes["packed_bytes"] + 1000


def test_sparse_kernels_are_stored_as_a_bitmask_and_their_nonzeros(tmp_path):
    net = nets.build("ResNet-8", masked=False, input_size=8)
    randomise(net)
    for key, mask in attach_masks(net).items():
        mask.keep_largest(net.layers[key].kernel.numpy(), 0.8)
    path = str(tmp_path / "sparse.npz")
    sizes = save_packed(net, path)
    spec, params, _ = read_packed(path)
    assert "transforms" not in spec  # the masks are baked: zeros in the params
    for key, value in baked(net).get_params().items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)
    assert 3.0 < sizes["float_bytes"] / sizes["packed_bytes"] < 4.5


def test_a_corrupt_or_missing_packed_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    for path, message in ((bad, "not a packed params file"), (tmp_path / "none.npz", "does not exist")):
        with pytest.raises(ParamsError, match=message) as err:
            load_packed(str(path))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("opt", ["weights", "centres", "both"])
def test_nuq_opt_trains_what_it_names_and_never_decays_the_centres(opt):
    from codebase.methods.quantization import attach_quantizers, nuq_task
    from op_utils.optim import SGD
    from op_utils.strategy import make_strategy
    from op_utils.trainer import Trainer

    # LeNet-5 (three quantized layers: conv2, fc1, fc2) traces its training step for a fraction of what
    # ResNet-8 with seven costs; which variables the task trains does not depend on the net.
    strategy = make_strategy(num_replicas=1)
    with strategy.scope():
        net = nets.build("LeNet-5", masked=False)
        randomise(net)
        layers = quantized_layers(net, False)
        quantizers = attach_quantizers(net, lambda key: NonUniformQuantizer(2, "channel"), layers, 32)
    assert layers == ["conv2", "fc1", "fc2"]
    centres = quantizers["weights"][0].centres
    kernel = net.layers["conv2"].kernel  # the kernel those centres quantize
    before = (centres.numpy().copy(), kernel.numpy().copy())
    trainer = Trainer(strategy, nuq_task(net, quantizers, opt), SGD(0.5, momentum=0.9, weight_decay=0.1),
                      global_batch_size=8)
    assert all(h["weight_decay"] == 0.0 for v, h in zip(trainer.variables, trainer.optimizer._hypers)
               if v is centres)
    x = input_for(net, batch=8)
    trainer.train_step(next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, np.arange(8) % 10)).batch(8)))))
    moved = (not np.array_equal(centres.numpy(), before[0]), not np.array_equal(kernel.numpy(), before[1]))
    assert moved == {"weights": (False, True), "centres": (True, False), "both": (True, True)}[opt]
