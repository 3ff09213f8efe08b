"""The package surface: the factory, the restricted unpickler, seeds and file sizes (import rules: tests/test_layering.py)."""
import pathlib
import pickle
import sys

import numpy as np
import pytest
import tensorflow as tf

import dataloader
from dataloader import Cifar, ImageNet, Mnist, build_dataset, seeds
from dataloader.safe_pickle import load_pickle
from tests.support import data as fakes
from utils.errors import ConfigError, DataError

PACKAGE = pathlib.Path(dataloader.__file__).parent


@pytest.mark.parametrize(
    "name, writer, cls",
    [("Cifar10", fakes.write_cifar10, Cifar), ("CIFAR100", fakes.write_cifar100, Cifar),
     ("MNIST", fakes.write_mnist, Mnist), (" imagenet ", fakes.write_imagenet, ImageNet)],
)
def test_factory_names_are_case_insensitive(tmp_path, name, writer, cls):
    fake = writer(tmp_path)
    dataset = build_dataset(name, fake.path)
    assert isinstance(dataset, cls) and isinstance(dataset, dataloader.Dataset)
    assert dataset.info.name == name.strip().lower()


def test_factory_passes_options(tmp_path):
    fake = fakes.write_imagenet(tmp_path)
    assert build_dataset("imagenet", fake.path, image_size=64, resize_size=72).info.image_shape == (64, 64, 3)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="svhn.*cifar10, cifar100, imagenet, mnist"):
        build_dataset("svhn")


def test_info_is_frozen(tmp_path):
    info = build_dataset("mnist", fakes.write_mnist(tmp_path).path).info
    with pytest.raises(AttributeError):
        info.num_train = 3


def test_unpickler_admits_numpy_arrays_and_scalars():
    obj = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), b"s": np.float32(1.5), b"l": [1, 2]}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        loaded = load_pickle(fakes.py2_pickle(obj, module), "x.pkl")
        np.testing.assert_array_equal(loaded[b"a"], obj[b"a"])
        assert loaded[b"s"] == np.float32(1.5) and loaded[b"l"] == [1, 2]


@pytest.mark.parametrize("forbidden", [pickle.loads, sys.exit, np.load])
def test_unpickler_refuses_other_globals(forbidden):
    data = pickle.dumps(forbidden, protocol=2)
    with pytest.raises(DataError, match=f"bad.pkl: refusing.*{forbidden.__name__}"):
        load_pickle(data, "bad.pkl")


def test_seeds_are_pure_and_distinct():
    # Pinned values, computed in another process: a resumed run (a new process, other global
    # seeds) must see the same order, so neither process state nor a salted hash may enter.
    state = np.random.get_state()
    try:
        np.random.seed(123)
        tf.random.set_seed(7)
        assert seeds.epoch_key(1, 2) == 7764949442709860949
        assert seeds.epoch_key(-5, 0) == 1238979733474613478
        np.testing.assert_array_equal(seeds.permutation(4, 1, 10), [6, 9, 8, 1, 2, 3, 7, 0, 5, 4])
    finally:
        np.random.set_state(state)
    assert len({seeds.epoch_key(1, 2), seeds.epoch_key(2, 1), seeds.epoch_key(1, 3)}) == 3
    assert sorted(seeds.permutation(4, 1, 10)) == list(range(10))


def test_files_stay_small():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path.name
