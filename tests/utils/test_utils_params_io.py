"""Tests for utils.params_io: safe loading, atomic saving and shape checking."""
import collections
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from utils.errors import ParamsError
from utils.params_io import check_params, load_params, save_params

REFERENCE = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pretrained"
    / "res56_cifar10.pkl"
)


def _sample_params():
    rng = np.random.default_rng(0)
    return {
        "conv/kernel:0": rng.standard_normal((3, 3, 3, 16)).astype(np.float32),
        "bn/moving_mean:0": rng.standard_normal((1, 1, 1, 16)).astype(np.float32),
        "BasicBlock0.0/conv1/kernel:0": rng.standard_normal((3, 3, 16, 16)).astype(np.float32),
        "fc/biases:0": rng.standard_normal((1, 10)).astype(np.float32),
        "step:0": np.array(7, dtype=np.int64),
        "double:0": np.arange(6, dtype=np.float64).reshape(2, 3),
        "strided:0": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }


def _assert_same(got, want):
    assert list(got) == list(want)
    for key, value in want.items():
        assert isinstance(got[key], np.ndarray), key
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value)


# --- round trips ---------------------------------------------------------------------


def test_save_load_round_trip_keeps_keys_shapes_dtypes_values(tmp_path):
    params = _sample_params()
    path = tmp_path / "deep" / "dir" / "params.pkl"  # parent is created
    save_params(path, params)
    _assert_same(load_params(path), params)
    assert os.listdir(path.parent) == ["params.pkl"]


def test_save_converts_values_with_asarray_and_skips_dunder_keys(tmp_path):
    path = tmp_path / "p.pkl"
    variable = tf.Variable(np.ones((2, 2), np.float32))
    save_params(path, {"list:0": [1.0, 2.0], "var:0": variable, "__header__": b"MATLAB"})
    got = load_params(path)
    assert list(got) == ["list:0", "var:0"]
    np.testing.assert_array_equal(got["list:0"], np.array([1.0, 2.0]))
    assert got["var:0"].dtype == np.float32 and got["var:0"].shape == (2, 2)


def test_save_rejects_non_str_keys_and_object_values(tmp_path):
    with pytest.raises(ParamsError, match="not a str"):
        save_params(tmp_path / "a.pkl", {1: np.zeros(2)})
    with pytest.raises(ParamsError, match="not a numeric array"):
        save_params(tmp_path / "b.pkl", {"x": [object()]})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_loads(tmp_path, protocol):
    params = _sample_params()
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(params, protocol=protocol))
    _assert_same(load_params(path), params)


def test_legacy_numpy_core_globals_load(tmp_path):
    # Pickles from numpy 1.x (like the reference file) name numpy.core, not numpy._core.
    params = _sample_params()
    data = pickle.dumps(params, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert legacy != data and b"numpy._core" not in legacy
    path = tmp_path / "legacy.pkl"
    path.write_bytes(legacy)
    _assert_same(load_params(path), params)


def test_mat_metadata_entries_are_dropped_and_ordered_dict_allowed(tmp_path):
    arrays = _sample_params()
    content = collections.OrderedDict(
        [("__header__", b"MATLAB 5.0 MAT-file"), ("__version__", "1.0"), ("__globals__", [])]
    )
    content.update(arrays)
    path = tmp_path / "mat.pkl"
    path.write_bytes(pickle.dumps(content, protocol=3))
    got = load_params(path)
    assert type(got) is dict
    _assert_same(got, arrays)


# --- refusing code -------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious(kind, marker):
    if kind == "os.system":
        return _Payload(os.system, f"echo pwned > {marker}")
    if kind == "eval":
        return _Payload(eval, f"open({str(marker)!r}, 'w').write('pwned')")
    return _Payload(subprocess.Popen, ["touch", str(marker)])


def test_payload_is_live_under_plain_pickle(tmp_path):
    # Control: the same payload really runs with an unrestricted unpickler.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps({"w": _malicious("os.system", marker)}))
    assert marker.read_text().strip() == "pwned"


@pytest.mark.parametrize(
    "kind, global_name",
    [("os.system", f"{os.system.__module__}.system"), ("eval", "builtins.eval"),
     ("popen", "subprocess.Popen")],
)
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, kind, global_name):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    # Hidden inside an otherwise valid params dict.
    path.write_bytes(pickle.dumps(
        {"conv/kernel:0": np.zeros(3, np.float32), "x": [_malicious(kind, marker)]}, protocol=4
    ))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message == (
        f"refusing to load {path}: it asks for {global_name}, which could run code; "
        "only arrays and plain containers are allowed"
    )
    assert "\n" not in message
    assert not marker.exists()


def test_codecs_encode_only_for_latin1(tmp_path):
    import codecs

    path = tmp_path / "rot.pkl"
    path.write_bytes(pickle.dumps({"x": _Payload(codecs.encode, "abc", "rot13")}, protocol=2))
    with pytest.raises(ParamsError, match="latin1"):
        load_params(path)


# --- broken files --------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pkl"
    with pytest.raises(ParamsError, match=re.escape(f"params file {path} does not exist")):
        load_params(path)


def test_truncated_pickle_names_the_file(tmp_path):
    data = pickle.dumps(_sample_params(), protocol=4)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"this is not a pickle", b"\x80\x04\x95garbage"])
def test_empty_or_corrupt_pickle(tmp_path, content):
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match=re.escape(f"cannot read params from {path}")):
        load_params(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ParamsError, match="is a directory"):
        load_params(tmp_path)


@pytest.mark.parametrize(
    "obj, problem",
    [
        ([np.zeros(3)], "expected a dict of name -> array, got list"),
        ({"a:0": [1.0, 2.0]}, "a:0 is a list, not an array"),
        ({"a:0": np.float32(1.0)}, "a:0 is a float32, not an array"),
        ({1: np.zeros(3)}, "key 1 is a int, not a str"),
        ({"a:0": np.array([1, "x"], dtype=object)}, "a:0 is an array of Python objects"),
    ],
)
def test_wrong_content_is_refused(tmp_path, obj, problem):
    path = tmp_path / "wrong.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == f"{path} does not hold params: {problem}"


# --- check_params --------------------------------------------------------------------


def test_check_params_message_names_counts_and_first_of_each():
    expected = {
        "conv/kernel:0": (3, 3, 3, 16),
        "bn/gamma:0": (16,),
        "fc/kernel:0": (64, 10),
        "fc/biases:0": (10,),
        "extra/a:0": (1,),
        "bn/beta:0": (16,),
    }
    got = {
        "conv/kernel:0": np.zeros((3, 3, 3, 8)),
        "bn/gamma:0": np.zeros((8,)),
        "bn/beta:0": np.zeros((16,)),
        "foo:0": np.zeros(1),
        "__header__": b"ignored",
    }
    with pytest.raises(ParamsError) as info:
        check_params(expected, got, what="ResNet-56")
    assert str(info.value) == (
        "params do not fit ResNet-56: 3 missing (first: fc/kernel:0), 1 unexpected "
        "(first: foo:0), 2 mis-shaped (first: conv/kernel:0 has (3,3,3,8), "
        "expected (3,3,3,16))"
    )


def test_check_params_only_lists_what_is_wrong():
    with pytest.raises(ParamsError) as info:
        check_params({"a:0": (2,), "b:0": (3,)}, {"a:0": np.zeros(2)})
    assert str(info.value) == "params do not fit network: 1 missing (first: b:0)"
    with pytest.raises(ParamsError) as info:
        check_params({"a:0": (2,)}, {"a:0": np.zeros((2, 1))}, what="VGG")
    assert str(info.value) == (
        "params do not fit VGG: 1 mis-shaped (first: a:0 has (2,1), expected (2))"
    )


def test_check_params_passes_on_exact_fit_and_accepts_tf_shapes():
    expected = {"k:0": tf.TensorShape([3, 3, 3, 16]), "b:0": (None, 10), "__version__": ()}
    got = {
        "k:0": tf.Variable(tf.zeros((3, 3, 3, 16))),
        "b:0": np.zeros((1, 10), np.float32),
        "__globals__": [],
    }
    assert check_params(expected, got) is None


def test_check_params_on_round_tripped_params(tmp_path):
    params = _sample_params()
    save_params(tmp_path / "p.pkl", params)
    check_params({k: v.shape for k, v in params.items()}, load_params(tmp_path / "p.pkl"))


# --- the real reference file ---------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not REFERENCE.exists(), reason=f"reference params not found at {REFERENCE}")
def test_reference_resnet56_pickle_loads():
    params = load_params(REFERENCE)
    assert not any(key.startswith("__") for key in params)
    assert len(params) == 287
    assert params["conv/kernel:0"].shape == (3, 3, 3, 16)
    assert params["bn/moving_mean:0"].shape == (1, 1, 1, 16)
    assert params["BasicBlock0.0/conv1/kernel:0"].shape == (3, 3, 16, 16)
    assert params["fc/biases:0"].shape == (1, 10)
    assert all(value.dtype == np.float32 for value in params.values())
    assert all(np.isfinite(value).all() for value in params.values())
    # Same arrays as an unrestricted load of this trusted, read-only file.
    with open(REFERENCE, "rb") as handle:
        trusted = pickle.load(handle)
    _assert_same(params, {k: v for k, v in trusted.items() if not k.startswith("__")})
