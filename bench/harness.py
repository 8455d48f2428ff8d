"""What the GPU benchmarks share: skip markers, the case grid of the memory-bound ops, and timing
one memory-bound case into extra_info.

Each memory-bound case is timed by pytest-benchmark (synchronizing inside the timed call) and,
for the figures in extra_info, by triton.testing.do_bench (CUDA events, median, L2 flushed
between runs): ms, GB/s of compulsory traffic, the fraction of the device's copy bandwidth (the
`copy_bandwidth` fixture of bench/conftest.py: cnnfast.roofline's cached measurement, so it is
the roofline's memory ceiling) and the speedup over the op's torch backend; graph_ms and
graph_speedup_vs_torch time CUDA-graph replays of the same calls, which leave out the launch cost.
"""
import pytest
import torch

from cnnfast.roofline import DTYPES

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
cpu_smoke = pytest.mark.skipif(HAS_CUDA, reason="CPU smoke case: the GPU cases run instead")


def gpu_cases(shapes, backends):
    """pytest params (shape, dtype name, backend) over every shape, dtype and backend."""
    return [
        pytest.param(shape, dtype_name, backend, id=f"{backend}-{dtype_name}-{'x'.join(map(str, shape))}")
        for shape in shapes
        for dtype_name in DTYPES
        for backend in backends
    ]


def time_case(benchmark, op, backend, traffic_bytes, copy_bandwidth, **info):
    """Times op(backend) and op("torch"); records the figures with `info` in extra_info."""
    import triton.testing

    def run():
        op(backend)
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=10, rounds=50)
    ms = triton.testing.do_bench(lambda: op(backend), warmup=25, rep=100, return_mode="median")
    ms_torch = triton.testing.do_bench(lambda: op("torch"), warmup=25, rep=100, return_mode="median")
    # The same, replayed from a CUDA graph: the kernel's own time, without the Python launch cost
    # that dominates a kernel of a few microseconds (the L2 is not flushed between replays).
    graph_ms = triton.testing.do_bench_cudagraph(lambda: op(backend), rep=50, return_mode="median")
    graph_ms_torch = triton.testing.do_bench_cudagraph(lambda: op("torch"), rep=50, return_mode="median")
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), backend=backend, ms=ms, gbps=traffic_bytes / (ms * 1e-3) / 1e9,
        copy_gbps=copy_bandwidth / 1e9, fraction_of_copy_bandwidth=traffic_bytes / (ms * 1e-3) / copy_bandwidth,
        speedup_vs_torch=ms_torch / ms, graph_ms=graph_ms, graph_speedup_vs_torch=graph_ms_torch / graph_ms, **info,
    )
    return ms
