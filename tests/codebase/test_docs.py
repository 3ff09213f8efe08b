"""The documentation's code runs: the worked "how to add a method" example, and the flags reference."""

import json
import pathlib
import re

import pytest

import train_cifar
from codebase import methods
from codebase.config import flags_markdown
from codebase.methods import base
from tests.support.data import write_mnist

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def test_the_flags_reference_of_usage_md_is_the_generated_one():
    text = (DOCS / "usage.md").read_text()
    begin, end = "<!-- flags: begin -->\n", "<!-- flags: end -->"
    assert begin in text and end in text
    assert text[text.index(begin) + len(begin):text.index(end)] == flags_markdown(), \
        "regenerate it: python3 -m codebase.config"


@pytest.fixture
def taylor_method(monkeypatch):
    """The example of docs/architecture.md, registered for the test only."""
    text = (DOCS / "architecture.md").read_text()
    section = text[text.index("## How to add a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))  # unregistered again after the test
    namespace = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)  # noqa: S102 - the project's own docs
    assert "taylor" in methods.method_names()
    return namespace


def test_the_worked_example_adds_a_method_with_its_flag_and_a_chain(taylor_method, tmp_path, capsys):
    # LeNet-5 on MNIST: the cheapest registered net to trace, and this chain traces six stages (a
    # baseline, the pruning, the KD fine-tuning, three tests); ResNet-8 on CIFAR-10 cost three times as much.
    data = write_mnist(tmp_path / "data", num_train=16, num_test=8).path
    run = tmp_path / "run"
    args = ["--method", "taylor,kd", "--arch", "LeNet-5", "--dataset", "mnist", "--data_path", str(data),
            "--train_path", str(run),
            "--train_epoch", "1", "--baseline_epoch", "1", "--steps_per_epoch", "1", "--batch_size", "8",
            "--val_batch_size", "8", "--taylor_images", "16", "--search_target_rate", "0.7", "--search_batch_size", "8"]
    results = train_cifar.main(args)
    assert list(results["steps"]) == ["0-baseline", "1-taylor", "2-kd"]
    pruned = json.loads((run / "1-taylor" / "prune_results.json").read_text())
    assert pruned["taylor_images"] == 16 and pruned["flops_rate"] <= 0.7
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"][1]["options"] == {"search_target_rate": 0.7, "search_batch_size": 8, "taylor_images": 16}
    with pytest.raises(SystemExit):
        train_cifar.main(args[:-6] + ["--taylor_images", "0", "--train_path", str(tmp_path / "bad")])
    assert "error: --taylor_images must be positive" in capsys.readouterr().err
