"""A training script's run: TensorFlow's modules and the toolkit's are frozen out of the garbage
collector for the run (imported first, then `utils.memory.frozen_heap`), and collectable after it."""

import pathlib
import subprocess
import sys

# In a fresh interpreter: the test harness freezes its own heap (tests/conftest.py), which makes the
# script's frozen_heap a no-op here.
RUN = """
import gc, sys
import codebase.config  # no TensorFlow yet: the script's run imports it
assert "tensorflow" not in sys.modules
seen = {}
parse = codebase.config.parse_config
def parse_config(*args, **kwargs):
    seen["frozen"] = gc.get_freeze_count()
    raise SystemExit(0 if seen["frozen"] > 100_000 else 3)  # TensorFlow's Python side alone is far more
codebase.config.parse_config = parse_config
import train_cifar
try:
    train_cifar.main(["--arch", "LeNet-5", "--train_path", sys.argv[1]])
except SystemExit as stop:
    assert stop.code == 0, f"only {seen['frozen']} objects frozen: frozen before TensorFlow was imported?"
assert gc.get_freeze_count() == 0, "not unfrozen after the run"
"""


def test_a_training_run_freezes_the_imported_modules_and_unfreezes_after(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "run")], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
