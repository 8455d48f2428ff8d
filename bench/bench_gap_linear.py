"""gap_linear benchmarks: the Triton and CUDA heads against PyTorch's mean -> linear, on the ImageNet heads.

    pytest bench/bench_gap_linear.py --benchmark-only [--benchmark-json FILE]

Traffic is compulsory: read x, weight and bias once, write the output once (bench/harness.py says
how cases are timed); TFLOP/s counts the linear layer, 2 * N * C * out_features, the count the op
registers with FlopCounterMode. Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from bench.harness import DTYPES, cpu_smoke, gpu_cases, needs_gpu, time_case
from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from tests.test_gap_linear import make_head, reference_gap_linear
from tests.test_global_avg_pool import make_input

# (N, C, H, W, out_features): the heads of ResNet-18/34, GoogLeNet and ResNet-50+ at batch 256,
# and ResNet-50's at the latency-bound batches 1 and 8.
GPU_SHAPES = [
    (256, 512, 7, 7, 1000), (256, 1024, 7, 7, 1000), (256, 2048, 7, 7, 1000),
    (8, 2048, 7, 7, 1000), (1, 2048, 7, 7, 1000),
]
CPU_SHAPES = [(8, 512, 7, 7, 1000)]


@needs_gpu
@pytest.mark.parametrize("shape, dtype_name, backend", gpu_cases(GPU_SHAPES, ("torch", "triton", "cuda")))
def test_gap_linear_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    dtype = DTYPES[dtype_name]
    x = make_input(shape[:4], dtype, "cuda")
    weight, bias = make_head(shape, dtype, "cuda")
    assert_close_to_reference(ops.gap_linear(x, weight, bias, backend=backend),
                              reference_gap_linear(x, weight, bias), "conv")
    n, c, _, _, out_features = shape
    traffic = (x.numel() + weight.numel() + bias.numel() + n * out_features) * x.element_size()
    ms = time_case(benchmark, lambda b: ops.gap_linear(x, weight, bias, backend=b), backend, traffic, copy_bandwidth,
                   dtype=dtype_name, shape=list(shape))
    benchmark.extra_info["tflops"] = 2 * n * c * out_features / (ms * 1e-3) / 1e12


@cpu_smoke
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_gap_linear_cpu_smoke(benchmark, shape):
    x = make_input(shape[:4], torch.float32, "cpu")
    weight, bias = make_head(shape, torch.float32, "cpu")
    out = benchmark(ops.gap_linear, x, weight, bias, backend="torch")
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
