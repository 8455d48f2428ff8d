"""Test and benchmark setup: without a GPU, Triton runs under its interpreter (the variable must be set before
triton is first imported), and tests marked `gpu` are skipped. backend=None reads the committed tuning table
only, unless CNNFAST_TUNING_FILE names a local one (device_check.sh does, for the tables it measures): a
local table that `cnnfast tune` left on this machine would make runs depend on it.

On a GPU, a kernel that faults (an illegal address, say) leaves the process's CUDA context unusable, and
every later case in that process would fail on the error. So after each case that used CUDA, the context is
checked; if it is broken, a pytest-xdist worker ends itself (xdist reports the case as crashed and starts a
fresh worker for the remaining cases), and a run without workers stops, naming the case."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CNNFAST_TUNING_FILE", os.devnull)  # not a regular file: read as an empty table


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cuda_context_error() -> str | None:
    """The error of a CUDA context that an earlier kernel left unusable, else None. Faults during a
    kernel (illegal address, illegal instruction, launch failure) are sticky: every later call
    repeats them. A call that fails once and then succeeds was not such an error."""
    if not (HAS_CUDA and torch.cuda.is_initialized()):
        return None
    errors = []
    for _ in range(2):
        try:
            torch.cuda.synchronize()
        except RuntimeError as error:  # torch.AcceleratorError in recent versions
            errors.append(str(error))
        else:
            return None
    return errors[-1]


# Set by the teardown of the case after which the CUDA context was found broken.
broken_context: str | None = None
# Whether this process is a pytest-xdist worker (it has workerinput; an inherited environment
# variable would also mark a pytest run started from inside a worker).
xdist_worker = False


def pytest_configure(config):
    global xdist_worker
    xdist_worker = hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the case's own teardown: a broken context is an error of this case, named in its report."""
    global broken_context
    error = cuda_context_error()
    if error is not None:
        broken_context = f"the CUDA context is unusable after {item.nodeid}: {error.splitlines()[0]}"
        raise RuntimeError(broken_context)


def pytest_runtest_logfinish(nodeid, location):
    """Once that report is out: a worker ends itself (pytest-xdist reports the case as crashed and a
    fresh worker takes the remaining cases); a run without workers stops."""
    if broken_context is None:
        return
    if xdist_worker:
        os._exit(3)
    pytest.exit(f"{broken_context}; stopping (the remaining cases would fail on the same error)", returncode=1)
