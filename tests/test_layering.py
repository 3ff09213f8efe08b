"""Imports flow one way: utils <- op_utils <- nets <- codebase <- scripts; dataloader uses utils only.

This is the one place the import rules are checked, for every module of every package.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {
    "utils": {"utils"},
    "dataloader": {"utils", "dataloader"},
    "op_utils": {"utils", "op_utils"},
    "nets": {"utils", "op_utils", "nets"},
    "codebase": {"utils", "op_utils", "nets", "dataloader", "codebase"},
}
PROJECT = set(ALLOWED) | {"tests", "train_cifar", "train_imagenet", "test", "export", "benchmarks"}
# Packages held to a list of third-party imports as well (any other: the standard library only).
THIRD_PARTY = {
    "dataloader": {"numpy", "tensorflow"},  # data must load wherever TensorFlow runs, with nothing else
}


def imported_packages(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        for name in imported_packages(path):
            if name in PROJECT:
                assert name in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", sorted(THIRD_PARTY))
def test_third_party_imports_are_listed(package):
    for path in (ROOT / package).rglob("*.py"):
        for name in imported_packages(path):
            if name not in PROJECT and name not in sys.stdlib_module_names:
                assert name in THIRD_PARTY[package], f"{path.relative_to(ROOT)} imports {name}"


def test_scripts_import_only_codebase():
    for script in ("train_cifar.py", "train_imagenet.py", "test.py", "export.py"):
        names = {n for n in imported_packages(ROOT / script) if n in PROJECT}
        assert names <= {"codebase"}, f"{script} imports {names}"
