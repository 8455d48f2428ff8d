import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def cudnn_benchmark_mode():
    """cuDNN picks each convolution's algorithm by timing them (cnnfast.roofline.cudnn_autotuned):
    the cuDNN baselines are cuDNN at its best, as Triton's kernels are autotuned."""
    from cnnfast.roofline import cudnn_autotuned

    with cudnn_autotuned():
        yield


@pytest.fixture(scope="session")
def copy_bandwidth():
    """The device's copy bandwidth in bytes/s (read + written), the ceiling of the memory-bound
    benchmarks: cnnfast.roofline's cached measurement, the one the roofline reports use."""
    from cnnfast.roofline import ceilings

    return ceilings("cuda", torch.bfloat16)["copy_bytes_per_s"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drops the cases that have no timed round before pytest-benchmark writes its JSON: a run
    interrupted (device_check.sh's time limit sends SIGINT) inside a case's warm-up leaves that
    case without a round, and the JSON writer would then fail and save none of the cases that ran."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [case for case in benchmark_session.benchmarks if case.stats.data]
    yield
