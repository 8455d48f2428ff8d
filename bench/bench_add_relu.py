"""add_relu benchmarks: every backend on the residual adds of the ResNets.

    pytest bench/bench_add_relu.py --benchmark-only [--benchmark-json FILE]

Traffic is compulsory: read x and y once, write the output once (bench/harness.py says how cases
are timed). Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from bench.harness import DTYPES, cpu_smoke, gpu_cases, needs_gpu, time_case
from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from tests.test_add_relu import reference_add_relu
from tests.test_global_avg_pool import make_input

# (N, C, H, W) at batch 256: the block outputs of ResNet-18/34 (64x56x56) and of ResNet-50's four stages.
GPU_SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CPU_SHAPES = [(8, 256, 14, 14)]


@needs_gpu
@pytest.mark.parametrize("shape, dtype_name, backend", gpu_cases(GPU_SHAPES, ("torch", "cuda", "triton")))
def test_add_relu_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    x, y = (make_input(shape, DTYPES[dtype_name], "cuda") for _ in range(2))
    assert_close_to_reference(ops.add_relu(x, y, backend=backend), reference_add_relu(x, y), "elementwise")
    traffic = 3 * x.numel() * x.element_size()
    time_case(benchmark, lambda b: ops.add_relu(x, y, backend=b), backend, traffic, copy_bandwidth,
              dtype=dtype_name, shape=list(shape))


@cpu_smoke
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_add_relu_cpu_smoke(benchmark, shape):
    x, y = (make_input(shape, torch.float32, "cpu") for _ in range(2))
    out = benchmark(ops.add_relu, x, y, backend="torch")
    assert_close_to_reference(out, reference_add_relu(x, y), "elementwise")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
