"""add_relu benchmarks: every backend on the residual adds of the ResNets.

    pytest bench/bench_add_relu.py --benchmark-only [--benchmark-json FILE]

On a GPU each case is timed by pytest-benchmark (synchronizing inside the timed call) and, for the
figures in extra_info, by triton.testing.do_bench (CUDA events, median, L2 flushed between runs):
ms, GB/s of compulsory traffic (read x and y once, write the output once) and the fraction of the
device's measured copy bandwidth. Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from bench.bench_global_avg_pool import DTYPES, HAS_CUDA, copy_bandwidth  # noqa: F401 (a fixture)
from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from tests.test_add_relu import reference_add_relu
from tests.test_global_avg_pool import make_input

# (N, C, H, W) at batch 256: the block outputs of ResNet-18/34 (64x56x56) and of ResNet-50's four stages.
GPU_SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CPU_SHAPES = [(8, 256, 14, 14)]


def gpu_cases():
    for shape in GPU_SHAPES:
        for dtype_name in DTYPES:
            for backend in ("torch", "triton"):
                yield pytest.param(shape, dtype_name, backend, id=f"{backend}-{dtype_name}-{'x'.join(map(str, shape))}")


@pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
@pytest.mark.parametrize("shape, dtype_name, backend", list(gpu_cases()))
def test_add_relu_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    import triton.testing

    dtype = DTYPES[dtype_name]
    x, y = (make_input(shape, dtype, "cuda") for _ in range(2))
    assert_close_to_reference(ops.add_relu(x, y, backend=backend), reference_add_relu(x, y), "elementwise")

    def run():
        ops.add_relu(x, y, backend=backend)
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=10, rounds=50)
    ms = triton.testing.do_bench(lambda: ops.add_relu(x, y, backend=backend), warmup=25, rep=100)
    ms_torch = triton.testing.do_bench(lambda: ops.add_relu(x, y, backend="torch"), warmup=25, rep=100)
    traffic = 3 * x.numel() * x.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype=dtype_name, backend=backend, shape=list(shape),
        ms=ms, gbps=traffic / (ms * 1e-3) / 1e9, copy_gbps=copy_bandwidth / 1e9,
        fraction_of_copy_bandwidth=traffic / (ms * 1e-3) / copy_bandwidth, speedup_vs_torch=ms_torch / ms,
    )


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_add_relu_cpu_smoke(benchmark, shape):
    x, y = (make_input(shape, torch.float32, "cpu") for _ in range(2))
    out = benchmark(ops.add_relu, x, y, backend="torch")
    assert_close_to_reference(out, reference_add_relu(x, y), "elementwise")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
