"""global_avg_pool benchmarks: every backend on the real GAP inputs of the architectures.

    pytest bench/bench_global_avg_pool.py --benchmark-only [--benchmark-json FILE]

Traffic is compulsory: read the input once, write the output once (bench/harness.py says
how cases are timed). Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from bench.harness import DTYPES, cpu_smoke, gpu_cases, needs_gpu, time_case
from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from tests.test_global_avg_pool import make_input, reference_global_avg_pool

# (N, C, H, W) at batch 256: ResNet-18/34, GoogLeNet, ResNet-50/101/152, and one large map.
GPU_SHAPES = [(256, 512, 7, 7), (256, 1024, 7, 7), (256, 2048, 7, 7), (64, 256, 56, 56)]
CPU_SHAPES = [(8, 512, 7, 7)]


@needs_gpu
@pytest.mark.parametrize("shape, dtype_name, backend", gpu_cases(GPU_SHAPES, ("torch", "cuda", "triton")))
def test_global_avg_pool_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    x = make_input(shape, DTYPES[dtype_name], "cuda")
    assert_close_to_reference(ops.global_avg_pool(x, backend=backend), reference_global_avg_pool(x), "elementwise")
    traffic = (x.numel() + shape[0] * shape[1]) * x.element_size()
    time_case(benchmark, lambda b: ops.global_avg_pool(x, backend=b), backend, traffic, copy_bandwidth,
              dtype=dtype_name, shape=list(shape))


@cpu_smoke
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_global_avg_pool_cpu_smoke(benchmark, shape):
    x = make_input(shape, torch.float32, "cpu")
    out = benchmark(ops.global_avg_pool, x, backend="torch")
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
