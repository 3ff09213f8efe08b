"""Running ``tests/op_utils/train_toy.py`` in subprocesses, always bounded by timeouts, or in this process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_env(tf_config=None) -> dict:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def start_toy(train_path, out, args, log_path, tf_config=None) -> subprocess.Popen:
    """Starts ``train_toy`` writing its output to ``log_path``."""
    command = [sys.executable, "-m", "tests.op_utils.train_toy", "--train_path", str(train_path),
               "--out", str(out), *args]
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(command, cwd=REPO, env=toy_env(tf_config), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def tail(log_path, lines=25) -> str:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def wait_all(procs, logs, timeout: float) -> None:
    """Waits for every process; on timeout or failure kills the rest and raises."""
    deadline = time.monotonic() + timeout
    try:
        for proc, log in zip(procs, logs, strict=False):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"train_toy timed out after {timeout}s:\n{tail(log)}") from None
            if proc.returncode != 0:
                raise AssertionError(f"train_toy exited with {proc.returncode}:\n{tail(log)}")
    finally:
        for proc in procs:
            kill(proc)


def run_toy_here(train_path, out, args) -> dict:
    """`train_toy` in this process (the references a killed or multi-worker run is compared
    with need no process of their own: one TensorFlow start-up fewer each)."""
    from tests.op_utils import train_toy

    train_toy.main(["--train_path", str(train_path), "--out", str(out), *args])
    return load_result(out)


def load_result(out) -> dict:
    with open(str(out) + ".json", encoding="utf-8") as f:
        result = json.load(f)
    with np.load(str(out) + ".npz") as arrays:
        result["weights"] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return result


def latest_checkpoint_number(ckpt_dir):
    """The number in the ``checkpoint`` state file's latest entry, or None."""
    try:
        with open(os.path.join(ckpt_dir, "checkpoint"), encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    name = first.split('"')[1] if '"' in first else ""
    number = name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
