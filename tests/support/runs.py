"""What the pipeline tests read in a run: the training steps taken, folder digests, error lines; and the
tiny ResNet-8 start the layer-by-layer pruning tests share."""

import contextlib
import dataclasses
import hashlib
import pathlib

import numpy as np
import pytest

import nets
from codebase.artifacts import save_net
from op_utils.trainer import Trainer
from tests.support.data import write_cifar10
from tests.support.nets import randomise
from utils.params_io import load_params


class Crash(Exception):
    """Stands in for a process dying inside a training stage."""


@contextlib.contextmanager
def training_steps(crash_at=None):
    """Yields the list of global steps the trainers run while the block runs.

    Args:
        crash_at: Raise `Crash` instead of running this global step (the steps before it ran and
            their checkpoints were written; nothing of this step was).
    """
    steps = []
    real = Trainer.train_step

    def train_step(self, dist_batch):
        step = int(self.global_step.numpy()) + 1
        if step == crash_at:
            raise Crash(f"crashed before step {step}")
        steps.append(step)
        return real(self, dist_batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", train_step)
        yield steps


def digests(folder: pathlib.Path) -> dict:
    """`{relative path: sha256}` of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def changed(before: dict, after: dict) -> list:
    """The files of two `digests` that were added, removed or rewritten with other bytes."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def assert_same_params(got: pathlib.Path, want: pathlib.Path) -> None:
    got, want = load_params(got), load_params(want)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("error:")]


@dataclasses.dataclass
class Run:
    """A finished run: its folder, what `main` returned, and the training steps it took."""

    path: pathlib.Path
    results: dict
    steps: list = dataclasses.field(default_factory=list)
    stopped: dict = dataclasses.field(default_factory=dict)  # see `lenet_run`


def resnet8_start(root: pathlib.Path, method: str) -> list:
    """Writes tiny CIFAR-10 (`root/data`, 40 training images) and a randomised ResNet-8
    (`root/start.pkl`); returns the flags of a `method` run from it with one step per epoch and
    batches of 8 (add `--train_path` and the method's options)."""
    write_cifar10(root, per_batch=8, num_test=8)
    (root / "cifar-10-batches-py").rename(root / "data")
    net = nets.build("ResNet-8", masked=False)
    randomise(net)
    save_net(net, str(root / "start.pkl"))
    return ["--method", method, "--arch", "ResNet-8", "--dataset", "cifar10", "--data_path", str(root / "data"),
            "--trained_param", str(root / "start.pkl"), "--train_epoch", "1", "--steps_per_epoch", "1",
            "--batch_size", "8", "--val_batch_size", "8", "--search_batch_size", "8"]
