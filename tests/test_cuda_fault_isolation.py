"""The root conftest's guard against a faulting kernel, without a GPU: a CUDA context left unusable
ends the pytest-xdist worker (a fresh one runs the remaining cases) or stops a run without workers.
The fault is simulated: a case (or a fixture's teardown) swaps torch.cuda.synchronize for one that
raises CUDA's sticky error, or an error that the next call no longer repeats."""
import shutil
from pathlib import Path

import pytest
import torch

import conftest as root_conftest

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
CASES = f'''
import pytest
import torch

import conftest


def fake_cuda(synchronize):
    conftest.HAS_CUDA = True
    torch.cuda.is_initialized = lambda: True
    torch.cuda.synchronize = synchronize


def illegal_address():
    raise RuntimeError("{ILLEGAL_ADDRESS}")


def test_a_kernel_faults():
    fake_cuda(illegal_address)


@pytest.fixture
def faults_at_teardown():
    yield
    fake_cuda(illegal_address)
    illegal_address()  # the fixture's own teardown fails on the error


def test_a_fixture_faults(faults_at_teardown):
    pass


def test_leaves_a_one_off_error():
    calls = []

    def synchronize():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")

    fake_cuda(synchronize)


def test_a_later_case():
    pass
'''


@pytest.fixture
def suite(pytester):
    shutil.copy(ROOT_CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_cases=CASES)
    return pytester


def broken_after(case):
    return f"the CUDA context is unusable after test_cases.py::{case}"


def test_a_run_without_workers_stops_and_names_the_case(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-k", "a_kernel_faults or a_later_case")
    # The faulting case's body passed, its teardown reports the broken context, and the run stops
    # there: the later case never runs.
    message = f"{broken_after('test_a_kernel_faults')}: {ILLEGAL_ADDRESS}"
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_a_kernel_faults*", f"*RuntimeError: {message}",
                                 f"*Exit: {message}; stopping*"])
    result.assert_outcomes(passed=1, errors=1)
    assert result.ret == 1


def test_a_fault_in_a_fixture_teardown_is_blamed_on_its_case(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-k", "a_fixture_faults or a_later_case")
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_a_fixture_faults*",
                                 f"*Exit: {broken_after('test_a_fixture_faults')}; stopping*"])
    result.assert_outcomes(passed=1, errors=1)


def test_a_one_off_error_fails_its_case_and_the_run_goes_on(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-k", "one_off or a_later_case")
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_a_one_off_error*",
                                 "*RuntimeError: a CUDA error surfaced after test_cases.py::test_leaves_a_one_off_error: "
                                 "CUDA error: out of memory"])
    result.assert_outcomes(passed=2, errors=1)  # the later case ran


def test_an_xdist_worker_is_replaced_and_the_remaining_cases_run(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "-k", "a_kernel_faults or a_later_case")
    result.stdout.fnmatch_lines(["*replacing crashed worker gw0*"])
    result.stdout.fnmatch_lines([f"*RuntimeError: {broken_after('test_a_kernel_faults')}: {ILLEGAL_ADDRESS}",
                                 "*crashed while running*test_a_kernel_faults*"])
    # The faulting case: its body passed, its teardown error, its worker's crash; the later case ran
    # on the fresh worker and passed.
    result.assert_outcomes(passed=2, errors=1, failed=1)


def test_an_error_that_does_not_repeat_is_not_a_broken_context(monkeypatch):
    calls = []

    def synchronize():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(root_conftest, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert root_conftest.cuda_errors() == ["CUDA error: out of memory"] and len(calls) == 2
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: (_ for _ in ()).throw(RuntimeError(ILLEGAL_ADDRESS)))
    assert root_conftest.cuda_errors() == [ILLEGAL_ADDRESS, ILLEGAL_ADDRESS]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert root_conftest.cuda_errors() == []


def test_no_check_where_cuda_was_never_used(monkeypatch):
    def synchronize():
        raise AssertionError("synchronize would initialize CUDA")

    monkeypatch.setattr(root_conftest, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert root_conftest.cuda_errors() == []
