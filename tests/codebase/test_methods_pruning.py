"""Every pruning method end to end (`tests/support/smoke.py`), in its own file so that its runs
and the other methods' (test_methods.py) go to two test workers."""

import pytest

from tests.support.smoke import PRUNING, check_end_to_end, make_data, run_method


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory)


@pytest.fixture(scope="module", params=PRUNING)
def method_run(request, data, tmp_path_factory):
    return run_method(request.param, data, tmp_path_factory)


def test_every_pruning_method_runs_end_to_end(method_run, data, capsys):
    check_end_to_end(method_run, data, capsys)
