"""Test and benchmark setup: without a GPU, Triton runs under its interpreter (the variable must be set before
triton is first imported), and tests marked `gpu` are skipped. backend=None reads the committed tuning table
only, unless CNNFAST_TUNING_FILE names a local one (device_check.sh does, for the tables it measures): a
local table that `cnnfast tune` left on this machine would make runs depend on it. Likewise the Triton
convolution's stored kernel choices are neither read nor written, unless CNNFAST_KERNEL_CACHE names a file
(device_check.sh does for the benchmarks, which share it, and sets /dev/null for the tests, some of which
force a kernel's choice). The roofline ceilings' cache is the run's own (CNNFAST_CACHE_DIR).

On a GPU, a kernel that faults (an illegal address, say) leaves the process's CUDA context unusable, and
every later case in that process would fail on the error. So after each case that used CUDA, the context is
checked; if it is broken, a pytest-xdist worker ends itself (xdist reports the case as crashed and starts a
fresh worker for the remaining cases), and a run without workers stops, naming the case."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CNNFAST_TUNING_FILE", os.devnull)  # not a regular file: read as an empty table
os.environ.setdefault("CNNFAST_KERNEL_CACHE", os.devnull)  # the Triton conv measures its choices afresh
if "CNNFAST_CACHE_DIR" not in os.environ:
    # The roofline ceilings a test measures while other tests load the machine would be low: they go
    # to a cache of the run's own (shared by its xdist workers, which inherit the variable), never
    # to the user's, which `make report` then measures on a quiet machine.
    os.environ["CNNFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnfast-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CNNFAST_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cuda_errors() -> list[str]:
    """The CUDA errors that synchronizing reports now: none; one, an error of the work just done
    that a second synchronize no longer repeats; or two, a context that an earlier kernel left
    unusable (faults during a kernel, an illegal address or instruction, are sticky: every later
    call repeats them). Nothing is asked where CUDA was never initialised."""
    if not (HAS_CUDA and torch.cuda.is_initialized()):
        return []
    errors = []
    for _ in range(2):
        try:
            torch.cuda.synchronize()
        except RuntimeError as error:  # torch.AcceleratorError in recent versions
            errors.append(str(error).splitlines()[0])
        else:
            break
    return errors


# Set by the teardown of the case after which the CUDA context was found broken.
broken_context: str | None = None
# Whether this process is a pytest-xdist worker (it has workerinput; an inherited environment
# variable would also mark a pytest run started from inside a worker).
xdist_worker = False


def pytest_configure(config):
    global xdist_worker
    xdist_worker = hasattr(config, "workerinput")
    if xdist_worker:
        # The workers share the machine's cores: each takes its share for PyTorch's CPU threads
        # instead of all of them (2 workers x 2 threads on 2 cores only switch between each other).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workerinput["workercount"]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Around the case's teardown (its fixtures' finalizers included): a CUDA error is an error of
    this case, named in its report; a broken context also ends the process below."""
    global broken_context
    try:
        result = yield
    except BaseException:  # the teardown failed on its own: keep its error, still look at the context
        if len(cuda_errors()) == 2:
            broken_context = f"the CUDA context is unusable after {item.nodeid}"
        raise
    errors = cuda_errors()
    if len(errors) == 2:
        broken_context = f"the CUDA context is unusable after {item.nodeid}: {errors[-1]}"
        raise RuntimeError(broken_context)
    if errors:
        raise RuntimeError(f"a CUDA error surfaced after {item.nodeid}: {errors[0]}")
    return result


def pytest_runtest_logfinish(nodeid, location):
    """Once that report is out: a worker ends itself (pytest-xdist reports the case as crashed and a
    fresh worker takes the remaining cases); a run without workers stops."""
    if broken_context is None:
        return
    if xdist_worker:
        os._exit(3)
    pytest.exit(f"{broken_context}; stopping (the remaining cases would fail on the same error)", returncode=1)


@pytest.fixture
def precision_settings():
    """PyTorch's float32 precision settings (torch.backends...fp32_precision), restored after the
    test: a test that sets them apart from each other leaves the legacy TF32 flags raising."""
    settings = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul, torch.backends.cudnn,
                torch.backends)
    before = [setting.fp32_precision for setting in settings]
    yield
    for setting, value in zip(settings, before):
        setting.fp32_precision = value
