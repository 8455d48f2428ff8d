"""gap_linear benchmarks: the fused Triton head against PyTorch's mean -> linear, on the ImageNet heads.

    pytest bench/bench_gap_linear.py --benchmark-only [--benchmark-json FILE]

On a GPU each case is timed by pytest-benchmark (synchronizing inside the timed call) and, for the
figures in extra_info, by triton.testing.do_bench (CUDA events, median, L2 flushed between runs):
ms, GB/s of compulsory traffic (read x, weight and bias once, write the output once), the fraction
of the device's measured copy bandwidth, and TFLOP/s of the linear layer (2 * N * C * out_features,
the count the op registers with FlopCounterMode). Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from bench.bench_global_avg_pool import DTYPES, HAS_CUDA, copy_bandwidth  # noqa: F401 (a fixture)
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


def gpu_cases():
    for shape in GPU_SHAPES:
        for dtype_name in DTYPES:
            for backend in ("torch", "triton"):
                yield pytest.param(shape, dtype_name, backend, id=f"{backend}-{dtype_name}-{'x'.join(map(str, shape))}")


@pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
@pytest.mark.parametrize("shape, dtype_name, backend", list(gpu_cases()))
def test_gap_linear_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    import triton.testing

    dtype = DTYPES[dtype_name]
    x = make_input(shape[:4], dtype, "cuda")
    weight, bias = make_head(shape, dtype, "cuda")
    assert_close_to_reference(ops.gap_linear(x, weight, bias, backend=backend),
                              reference_gap_linear(x, weight, bias), "conv")

    def run():
        ops.gap_linear(x, weight, bias, backend=backend)
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=10, rounds=50)
    ms = triton.testing.do_bench(lambda: ops.gap_linear(x, weight, bias, backend=backend), warmup=25, rep=100)
    ms_torch = triton.testing.do_bench(lambda: ops.gap_linear(x, weight, bias, backend="torch"), warmup=25, rep=100)
    n, c, _, _, out_features = shape
    traffic = (x.numel() + weight.numel() + bias.numel() + n * out_features) * x.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype=dtype_name, backend=backend, shape=list(shape),
        ms=ms, gbps=traffic / (ms * 1e-3) / 1e9, copy_gbps=copy_bandwidth / 1e9,
        fraction_of_copy_bandwidth=traffic / (ms * 1e-3) / copy_bandwidth, speedup_vs_torch=ms_torch / ms,
        tflops=2 * n * c * out_features / (ms * 1e-3) / 1e12,
    )


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_gap_linear_cpu_smoke(benchmark, shape):
    x = make_input(shape[:4], torch.float32, "cpu")
    weight, bias = make_head(shape, torch.float32, "cpu")
    out = benchmark(ops.gap_linear, x, weight, bias, backend="torch")
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
