"""Real processes: resume after SIGKILL mid-epoch, and two-worker training on loopback."""
import os
import signal
import time

import numpy as np
import pytest

from tests.support.procs import (
    free_port,
    kill,
    latest_checkpoint_number,
    load_result,
    run_toy_here,
    start_toy,
    tail,
    wait_all,
)

EPOCHS, STEPS = 3, 6
COMMON = ["--epochs", str(EPOCHS), "--steps_per_epoch", str(STEPS), "--ckpt_every", "2"]


def assert_same_weights(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    # Slow batches (0.25 s each, two per step) leave time to kill between checkpoints; only from the
    # second epoch on, where the kill lands (the first one has nothing to wait for). The process
    # starts TensorFlow while the uninterrupted run trains here, and trains once that is done (`go`),
    # so that this loop watches its checkpoints from the first step on.
    train_path = tmp_path / "killed"
    log = tmp_path / "killed.log"
    go = tmp_path / "go"
    proc = start_toy(train_path, tmp_path / "killed_out",
                     COMMON + ["--replicas", "2", "--step_delay", "0.25", "--delay_from_epoch", "1",
                               "--start_file", str(go)], log)
    try:
        full = run_toy_here(tmp_path / "full", tmp_path / "full_out", COMMON + ["--replicas", "2"])
        go.touch()
        deadline = time.monotonic() + 180
        while True:
            number = latest_checkpoint_number(train_path / "ckpt")
            # A mid-epoch checkpoint of the second epoch: global step 8 or 10.
            if number is not None and number > STEPS and number % STEPS:
                break
            assert proc.poll() is None, f"run ended before it could be killed:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no mid-epoch checkpoint in time:\n{tail(log)}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(str(tmp_path / "killed_out") + ".json")

    # Only the killed run needs a process of its own; its resumption runs here.
    resumed = run_toy_here(train_path, tmp_path / "resumed_out", COMMON + ["--replicas", "2", "--resume"])
    start = resumed["start"]
    assert start["epoch"] == 1 and 0 < start["step_in_epoch"] < STEPS, start
    assert start["global_step"] == STEPS + start["step_in_epoch"]
    assert resumed["global_step"] == resumed["iterations"] == EPOCHS * STEPS
    assert_same_weights(resumed["weights"], full["weights"])
    assert resumed["logs"]["loss"] == pytest.approx(full["logs"]["loss"], rel=1e-5)
    assert resumed["logs"]["eval_loss"] == pytest.approx(full["logs"]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_workers_on_loopback_match_a_single_process(tmp_path):
    args = ["--epochs", "2", "--steps_per_epoch", "3", "--ckpt_every", "2"]
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    train_path = tmp_path / "multi"
    procs, logs = [], []
    try:
        for index in range(2):
            logs.append(tmp_path / f"worker{index}.log")
            procs.append(start_toy(
                train_path, tmp_path / f"worker{index}_out", args, logs[-1],
                tf_config={"cluster": cluster, "task": {"type": "worker", "index": index}}))
        # The single-process reference trains here while the workers start TensorFlow.
        single = run_toy_here(tmp_path / "single", tmp_path / "single_out", args + ["--replicas", "1"])
    except BaseException:
        for proc in procs:
            kill(proc)
        raise
    # Bounded: kills both workers and fails if either hangs or fails.
    wait_all(procs, logs, timeout=240)

    for index in range(2):
        worker = load_result(tmp_path / f"worker{index}_out")
        assert worker["global_step"] == 6
        assert_same_weights(worker["weights"], single["weights"])
        for key in ("loss", "top1", "eval_loss", "eval_top1", "eval_count"):
            assert worker["logs"][key] == pytest.approx(single["logs"][key], rel=1e-5), key
    # Only the chief's checkpoints are kept; the other worker's temporary copy is gone.
    ckpt = train_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".index")) == \
        ["ckpt-4.index", "ckpt-6.index"]
    assert not [p for p in ckpt.iterdir() if p.is_dir()]
