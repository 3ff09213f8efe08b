"""Data-free KD's activation statistics: streaming moments, sampling, the layer graph, the metadata file."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.dfkd_stats import (ClassMoments, cholesky_factor, collect_statistics, graph_basis, layer_statistics,
                                 load_stats, pair_adjacency, record_sites, sample_targets, save_stats)
from nets.sites import Record
from tests.support.nets import TwoConvBN, randomise
from utils.errors import ConfigError


def small_mlp(hidden=(16, 12), **kwargs):
    net = nets.build("MLP", masked=False, hidden=list(hidden), input_size=6, num_classes=5, **kwargs)
    randomise(net)
    return net


def dataset(net, n, classes, batch, seed=0):
    """`(images, labels, weights)` batches of random images, class i % classes for image i."""
    size, channels = net.config["input_size"], net.groups["input"].size
    images = np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)
    labels = np.arange(n) % classes
    ds = tf.data.Dataset.from_tensor_slices((images, labels, np.ones(n, np.float32))).batch(batch)
    return images, labels, ds


def reference_moments(values, labels, classes):
    """Per-class mean, population covariance and std by numpy on the whole set."""
    mean = np.stack([values[labels == c].mean(0) for c in range(classes)])
    cov = np.stack([np.cov(values[labels == c], rowvar=False, bias=True).reshape(values.shape[1], -1)
                    for c in range(classes)])
    return mean, cov, np.sqrt(np.einsum("cii->ci", cov))


def recorded(net, images, sites, temperature):
    """`{site: [n, D] float64}` of an eager forward pass, flattened, the logits divided by T."""
    record = Record(sites)
    net(images, training=False, tap=record)
    logits = record_sites(net)[-1]
    return {s: np.asarray(v, np.float64).reshape(len(images), -1) / (temperature if s == logits else 1.0)
            for s, v in record.values.items()}


def test_record_sites_are_the_conv_and_dense_outputs_in_forward_order():
    assert record_sites(nets.build("LeNet-5", masked=False)) == ["conv1:out", "conv2:out", "fc1:out", "fc2:out",
                                                                 "fc3:out"]
    assert record_sites(small_mlp()) == ["fc1:out", "fc2:out", "logits:out"]
    assert record_sites(TwoConvBN(masked=False)) == ["conv1:out", "conv2:out", "fc:out"]  # not the BN outputs


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_streaming_moments_equal_numpy_over_uneven_batches_with_missing_classes(chunk):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 1e4  # a large offset: the merge must be stable
    labels = rng.integers(0, 3, size=300)
    labels[:40] = rng.integers(0, 2, size=40)  # class 2 is missing from the first batches
    moments = ClassMoments(3, 4, chunk=chunk)
    start = 0
    for size in [1, 7, 30, 2, 60, 200]:
        moments.update(x[start:start + size], labels[start:start + size])
        start += size
    mean, cov, std = reference_moments(x, labels, 3)
    np.testing.assert_array_equal(moments.count, np.bincount(labels, minlength=3))
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(moments.cov, cov, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(moments.std, std, rtol=1e-8)


def test_reading_a_class_never_seen_names_it():
    moments = ClassMoments(4, 2, what="fc1:out")
    moments.update(np.ones((3, 2)), [0, 1, 1])
    assert list(moments.count) == [1, 2, 0, 0]
    for read in (lambda: moments.mean, lambda: moments.cov, lambda: moments.std):
        with pytest.raises(ValueError, match="fc1:out: classes 2, 3 never seen"):
            read()
    with pytest.raises(ValueError, match="outside 0..3"):
        moments.update(np.ones((1, 2)), [4])


def test_cholesky_samples_have_the_requested_covariance():
    cov = np.array([[2.0, 0.8, -0.5], [0.8, 1.0, 0.3], [-0.5, 0.3, 0.5]])
    mean = np.array([1.0, -2.0, 0.5])
    chol = cholesky_factor(cov, "test")
    samples = sample_targets(mean, chol, 20000, seed=3)
    assert samples.dtype == np.float32 and samples.shape == (20000, 3)
    np.testing.assert_array_equal(samples, sample_targets(mean, chol, 20000, seed=3))
    # Standard errors at 20k samples: about 0.01 for the means, 0.02 for the covariance entries. Sigma^2
    # (what multiplying by the covariance gives) differs from Sigma by more than 0.3 in every diagonal entry.
    np.testing.assert_allclose(samples.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(samples, rowvar=False), cov, atol=0.08)


def test_a_singular_covariance_is_regularised_and_logged(caplog):
    v = np.array([1.0, 2.0, 0.0])
    singular = np.outer(v, v)  # rank one; the third unit is constant
    with caplog.at_level(logging.WARNING, logger="codebase.dfkd_stats"):
        chol = cholesky_factor(singular, "conv1:out class 3")
    assert len(caplog.records) == 1
    assert "conv1:out class 3" in caplog.text and "1e-6" in caplog.text
    np.testing.assert_allclose(chol @ chol.T, singular + 1e-6 * np.trace(singular) / 3 * np.eye(3), atol=1e-12)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="codebase.dfkd_stats"):
        zero = cholesky_factor(np.zeros((2, 2)), "constant site")  # no variance at all: jitter of 1e-6
    np.testing.assert_allclose(zero, 1e-3 * np.eye(2))
    assert "constant site" in caplog.text


def test_graph_basis_of_a_path_graph_is_its_known_laplacian_eigenbasis():
    # Three vertices in a path (two 1x1 blocks): eigenvalues 0, 1, 3 with eigenvectors (1, 1, 1)/sqrt 3,
    # (1, 0, -1)/sqrt 2, (1, -2, 1)/sqrt 6, each signed so that its largest-magnitude entry (the first, on a
    # tie) is positive.
    basis, eigenvalues = graph_basis([np.ones((1, 1)), np.ones((1, 1))], fraction=1.0)
    np.testing.assert_allclose(eigenvalues, [0, 1, 3], atol=1e-12)
    expected = np.stack([np.ones(3) / np.sqrt(3), np.array([1, 0, -1]) / np.sqrt(2),
                         np.array([-1, 2, -1]) / np.sqrt(6)], axis=1)
    np.testing.assert_allclose(basis, expected, atol=1e-12)
    basis, eigenvalues = graph_basis([np.ones((1, 1)), np.ones((1, 1))], fraction=0.3)  # round(0.9) = 1
    assert basis.shape == (3, 1) and np.allclose(eigenvalues, [0], atol=1e-12)


def test_graph_basis_of_a_two_block_chain_equals_the_dense_laplacian_built_by_hand():
    rng = np.random.default_rng(1)
    a01, a12 = rng.uniform(size=(2, 3)), rng.uniform(size=(3, 4))
    w = np.zeros((9, 9))
    w[0:2, 2:5], w[2:5, 5:9] = a01, a12
    w = w + w.T
    values, vectors = np.linalg.eigh(np.diag(w.sum(1)) - w)
    basis, eigenvalues = graph_basis([a01, a12], fraction=0.5)  # k = round(4.5) = 4 (to even)
    assert basis.shape == (9, 4)
    np.testing.assert_allclose(eigenvalues, values[:4], atol=1e-12)
    vectors = vectors[:, :4] * np.sign(vectors[np.argmax(np.abs(vectors[:, :4]), 0), np.arange(4)])
    np.testing.assert_allclose(basis, vectors, atol=1e-10)


def test_pair_adjacency_of_dense_layers_is_the_absolute_kernel():
    net = small_mlp()
    params = net.get_params()
    # fc1:out -> ReLU -> fc2 -> fc2:out: the one-hot passes the ReLU, the bias is dropped.
    np.testing.assert_allclose(pair_adjacency(net, "fc1:out", "fc2:out", chunk=5), np.abs(params["fc2/kernel:0"]),
                               rtol=1e-6)
    np.testing.assert_allclose(pair_adjacency(net, "fc2:out", "logits:out"), np.abs(params["logits/kernel:0"]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="does not come after"):
        pair_adjacency(net, "fc2:out", "fc1:out")


def test_pair_adjacency_through_relu_max_pool_conv_and_flatten_equals_a_brute_force_construction():
    # 15x15 input: conv1 SAME (15x15x6) - pool to 7x7 (row and column 14 dropped) - conv2 VALID 5x5 (3x3x16) -
    # pool to 1x1 (row and column 2 dropped) - flatten (16) - fc1.
    net = nets.build("LeNet-5", masked=False, num_classes=10, input_size=15)
    randomise(net)
    params = net.get_params()
    k2, w1 = np.abs(params["conv2/kernel:0"]), np.abs(params["fc1/kernel:0"])
    expected = np.zeros((15, 15, 6, 3, 3, 16))
    for h in range(14):
        for w in range(14):
            for i in range(3):
                for j in range(3):
                    p, q = h // 2 - i, w // 2 - j
                    if 0 <= p < 5 and 0 <= q < 5:
                        expected[h, w, :, i, j, :] = k2[p, q]
    np.testing.assert_allclose(pair_adjacency(net, "conv1:out", "conv2:out", chunk=400),
                               expected.reshape(15 * 15 * 6, 3 * 3 * 16), rtol=1e-6)
    expected = np.zeros((3, 3, 16, 120))
    expected[:2, :2] = w1  # every pooled unit of the 2x2 window reaches fc1 through the flattened 1x1x16 map
    np.testing.assert_allclose(pair_adjacency(net, "conv2:out", "fc1:out"), expected.reshape(144, 120), rtol=1e-6)


def test_pair_adjacency_scales_by_the_absolute_batchnorm_and_averages_a_global_pool():
    net = TwoConvBN(masked=False, kernel=1, input_size=4)
    randomise(net)
    p = net.get_params()
    p["bn1/gamma:0"] = -p["bn1/gamma:0"]  # negative scales count by their magnitude
    net.set_params(p)

    def bn_scale(key):
        return np.abs(p[f"{key}/gamma:0"]).reshape(-1) / np.sqrt(p[f"{key}/moving_variance:0"].reshape(-1) + 1e-5)

    per_position = bn_scale("bn1")[:, None] * np.abs(p["conv2/kernel:0"][0, 0])  # [8, 6]
    np.testing.assert_allclose(pair_adjacency(net, "conv1:out", "conv2:out"), np.kron(np.eye(16), per_position),
                               rtol=1e-5)
    pooled = bn_scale("bn2")[:, None] * np.abs(p["fc/kernel:0"]) / 16  # the mean over the 4x4 map
    np.testing.assert_allclose(pair_adjacency(net, "conv2:out", "fc:out"), np.tile(pooled, (16, 1)), rtol=1e-5)


def test_layer_statistics_equal_numpy_moments_of_the_recorded_activations():
    net = nets.build("LeNet-5", masked=False, num_classes=10, input_size=28)
    randomise(net)
    images, labels, ds = dataset(net, 30, 10, batch=7)  # a last batch of 2
    sites = ["conv2:out", "fc1:out", "fc3:out"]  # conv1's 4704 units would cost 1.8 GB of covariances here
    stats = layer_statistics(net, ds, sites, temperature=8.0, num_classes=10)
    values = recorded(net, images, sites, 8.0)
    np.testing.assert_allclose(values["fc3:out"] * 8.0, net(images), rtol=1e-5, atol=1e-5)
    assert list(stats) == sites
    for site in sites:
        mean, cov, std = reference_moments(values[site], labels, 10)
        got = stats[site]
        assert got["mean"].dtype == got["std"].dtype == got["cov"].dtype == np.float32
        scale = np.abs(values[site]).max()
        np.testing.assert_array_equal(got["count"], np.full(10, 3))
        np.testing.assert_allclose(got["mean"], mean, atol=1e-5 * scale)
        np.testing.assert_allclose(got["cov"], cov, atol=1e-5 * scale ** 2)
        np.testing.assert_allclose(got["std"], std, atol=1e-5 * scale)
    assert stats["conv2:out"]["shape"] == (10, 10, 16) and stats["fc3:out"]["shape"] == (10,)


def test_spectral_statistics_are_the_moments_of_the_basis_coefficients_in_the_same_pass():
    net = small_mlp()
    images, labels, ds = dataset(net, 40, 5, batch=9)
    sites = record_sites(net)
    layers, spectral = collect_statistics(net, ds, sites, 8.0, 5, fraction=0.25, mode="all_layers")
    assert list(spectral) == ["all"] and spectral["all"]["sites"] == sites
    blocks = [pair_adjacency(net, a, b) for a, b in zip(sites, sites[1:])]
    basis, eigenvalues = graph_basis(blocks, 0.25)
    graph = spectral["all"]
    assert graph["basis"].dtype == np.float32 and graph["basis"].shape == (16 + 12 + 5, 8)
    np.testing.assert_allclose(graph["basis"], basis, atol=1e-6)
    np.testing.assert_allclose(graph["eigenvalues"], eigenvalues, rtol=1e-5, atol=1e-6)
    values = recorded(net, images, sites, 8.0)
    coefficients = np.concatenate([values[s] for s in sites], 1) @ graph["basis"].astype(np.float64)
    mean, cov, std = reference_moments(coefficients, labels, 5)
    scale = np.abs(coefficients).max()
    np.testing.assert_allclose(graph["mean"], mean, atol=1e-5 * scale)
    np.testing.assert_allclose(graph["cov"], cov, atol=1e-5 * scale ** 2)
    np.testing.assert_allclose(graph["std"], std, atol=1e-5 * scale)
    # The layer statistics of the same pass are layer_statistics'.
    alone = layer_statistics(net, ds, sites, 8.0, 5)
    for site in sites:
        np.testing.assert_allclose(layers[site]["cov"], alone[site]["cov"], rtol=1e-6, atol=1e-9)
    _, pairs = collect_statistics(net, ds, sites, 8.0, 5, fraction=0.25, mode="layer_pairs", layers=False)
    assert list(pairs) == ["fc1:out|fc2:out", "fc2:out|logits:out"]
    assert pairs["fc1:out|fc2:out"]["basis"].shape == (28, 7) and pairs["fc2:out|logits:out"]["sites"] == sites[1:]
    with pytest.raises(ValueError, match="spectral mode 'pairs'"):
        collect_statistics(net, ds, sites, 8.0, 5, fraction=0.25, mode="pairs")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small MLP and the path of its saved layer and spectral statistics."""
    net = small_mlp()
    _, _, ds = dataset(net, 20, 5, batch=8)
    layers, spectral = collect_statistics(net, ds, record_sites(net), 8.0, 5, fraction=0.25, mode="layer_pairs")
    path = str(tmp_path_factory.mktemp("stats") / "teacher.dfkd.npz")
    save_stats(path, net, 8.0, layers, spectral)
    return net, path, layers, spectral


def test_saved_statistics_load_back_exactly(saved):
    net, path, layers, spectral = saved
    assert os.listdir(os.path.dirname(path)) == ["teacher.dfkd.npz"]  # no temporary file left behind
    temperature, got_layers, got_spectral = load_stats(path, net, need_spectral=True)
    assert temperature == 8.0 and list(got_layers) == list(layers) and list(got_spectral) == list(spectral)
    for site, stats in layers.items():
        assert got_layers[site]["shape"] == stats["shape"]
        for field in ("mean", "std", "cov", "count"):
            np.testing.assert_array_equal(got_layers[site][field], stats[field])
    for name, graph in spectral.items():
        assert got_spectral[name]["sites"] == graph["sites"]
        for field in ("basis", "eigenvalues", "mean", "std", "cov", "count"):
            np.testing.assert_array_equal(got_spectral[name][field], graph[field])
    with np.load(path, allow_pickle=False) as data:  # plain arrays, and the teacher's spec in the metadata
        assert json.loads(str(data["meta"]))["spec"] == json.loads(json.dumps(net.spec()))
    without = os.path.join(os.path.dirname(path), "layers-only", "teacher.npz")
    save_stats(without, net, 8.0, layers, None)
    assert load_stats(without, net)[2] is None


def rewritten(path, tmp_path, change):
    """A copy of the file at `path` with `change(arrays)` applied."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    target = str(tmp_path / "changed.npz")
    np.savez(target, **arrays)
    return target


def edit_meta(**changes):
    def change(arrays):
        arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **changes}))
    return change


@pytest.mark.parametrize("case, match", [
    ("missing", "nothing.npz does not exist"),
    ("garbage", "not a readable DFKD statistics file"),
    ("truncated", "not a readable DFKD statistics file"),
    ("npy", "not a readable DFKD statistics file .a single array"),
    ("no meta", "not a DFKD statistics file .no readable 'meta'"),
    ("format", "format 99; this version reads format 1"),
    ("arch", "another net than this MLP .arch LeNet-5, not MLP"),
    ("config", r"another net than this MLP .config hidden \[16, 10\], not \[16, 12\]"),
    ("widths", "another net than this MLP .widths fc1 8, not 16"),
    ("sites", r"statistics of sites \['fc1:out'\], not this net's"),
    ("no spectral", "holds no spectral statistics"),
    ("missing array", "array layer/fc2:out/cov is missing"),
])
def test_a_bad_statistics_file_is_refused_in_one_line(saved, tmp_path, case, match):
    net, path, layers, _ = saved
    target = str(tmp_path / "bad.npz")
    if case == "missing":
        target = str(tmp_path / "nothing.npz")
    elif case == "garbage":
        (tmp_path / "bad.npz").write_bytes(b"not an archive at all")
    elif case == "truncated":
        data = open(path, "rb").read()
        (tmp_path / "bad.npz").write_bytes(data[:len(data) // 2])
    elif case == "npy":
        np.save(open(target, "wb"), np.zeros(3))
    elif case == "no meta":
        target = rewritten(path, tmp_path, lambda arrays: arrays.pop("meta"))
    elif case == "format":
        target = rewritten(path, tmp_path, edit_meta(format=99))
    elif case == "arch":
        target = rewritten(path, tmp_path, edit_meta(spec=nets.build("LeNet-5", masked=False).spec()))
    elif case == "config":
        target = rewritten(path, tmp_path, edit_meta(spec=small_mlp(hidden=(16, 10)).spec()))
    elif case == "widths":
        target = rewritten(path, tmp_path, edit_meta(spec=small_mlp(widths={"fc1": 8}).spec()))
    elif case == "sites":
        target = rewritten(path, tmp_path, edit_meta(sites=["fc1:out"]))
    elif case == "no spectral":
        save_stats(target, net, 8.0, layers, None)
    elif case == "missing array":
        target = rewritten(path, tmp_path, lambda arrays: arrays.pop("layer/fc2:out/cov"))
    with pytest.raises(ConfigError, match=match) as err:
        load_stats(target, net, need_spectral=True)
    assert "\n" not in str(err.value) and target in str(err.value)
