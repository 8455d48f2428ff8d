"""The root conftest's guard against a faulting kernel, without a GPU: a CUDA context left unusable
ends the pytest-xdist worker (a fresh one runs the remaining cases) or stops a run without workers.
The fault is simulated: a case swaps torch.cuda.synchronize for one that raises CUDA's sticky error."""
import shutil
from pathlib import Path

import pytest
import torch

import conftest as root_conftest

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
CASES = f'''
import torch

import conftest


def test_a_kernel_faults():
    conftest.HAS_CUDA = True
    torch.cuda.is_initialized = lambda: True

    def synchronize():
        raise RuntimeError("{ILLEGAL_ADDRESS}")

    torch.cuda.synchronize = synchronize


def test_a_later_case():
    assert torch.cuda.synchronize is not None
'''


@pytest.fixture
def faulting_suite(pytester):
    shutil.copy(ROOT_CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_cases=CASES)
    return pytester


BROKEN = f"the CUDA context is unusable after test_cases.py::test_a_kernel_faults: {ILLEGAL_ADDRESS}"


def test_a_run_without_workers_stops_and_names_the_case(faulting_suite):
    result = faulting_suite.runpytest_subprocess("-p", "no:cacheprovider")
    # The faulting case's body passed, its teardown reports the broken context, and the run stops
    # there: the later case never runs.
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_a_kernel_faults*", f"*RuntimeError: {BROKEN}",
                                 f"*Exit: {BROKEN}; stopping*"])
    result.assert_outcomes(passed=1, errors=1)
    assert result.ret == 1


def test_an_xdist_worker_is_replaced_and_the_remaining_cases_run(faulting_suite):
    result = faulting_suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1")
    result.stdout.fnmatch_lines(["*replacing crashed worker gw0*"])
    result.stdout.fnmatch_lines([f"*RuntimeError: {BROKEN}", "*crashed while running*test_a_kernel_faults*"])
    # The faulting case: its body passed, its teardown error, its worker's crash; the later case ran
    # on the fresh worker and passed.
    result.assert_outcomes(passed=2, errors=1, failed=1)


def test_an_error_that_does_not_repeat_is_not_a_broken_context(monkeypatch):
    calls = []

    def synchronize():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(root_conftest, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert root_conftest.cuda_context_error() is None and len(calls) == 2
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: (_ for _ in ()).throw(RuntimeError(ILLEGAL_ADDRESS)))
    assert root_conftest.cuda_context_error() == ILLEGAL_ADDRESS


def test_no_check_where_cuda_was_never_used(monkeypatch):
    def synchronize():
        raise AssertionError("synchronize would initialize CUDA")

    monkeypatch.setattr(root_conftest, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert root_conftest.cuda_context_error() is None
