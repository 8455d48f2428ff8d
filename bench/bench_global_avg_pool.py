"""global_avg_pool benchmarks: every backend on the real GAP inputs of the architectures.

    pytest bench/bench_global_avg_pool.py --benchmark-only [--benchmark-json FILE]

On a GPU each case is timed by pytest-benchmark (synchronizing inside the timed call) and, for the
figures in extra_info, by triton.testing.do_bench (CUDA events, median, L2 flushed between runs):
ms, GB/s of compulsory traffic (read the input once, write the output once) and the fraction of
the device's measured copy bandwidth. Without a GPU only a small CPU smoke set runs.
"""
import pytest
import torch

from cnnfast import ops
from tests.test_global_avg_pool import make_input, reference_global_avg_pool
from cnnfast.testing import assert_close_to_reference

HAS_CUDA = torch.cuda.is_available()
# (N, C, H, W) at batch 256: ResNet-18/34, GoogLeNet, ResNet-50/101/152, and one large map.
GPU_SHAPES = [(256, 512, 7, 7), (256, 1024, 7, 7), (256, 2048, 7, 7), (64, 256, 56, 56)]
CPU_SHAPES = [(8, 512, 7, 7)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() / (ms * 1e-3)


def gpu_cases():
    for shape in GPU_SHAPES:
        for dtype_name in DTYPES:
            for backend in ("torch", "cuda", "triton"):
                yield pytest.param(shape, dtype_name, backend, id=f"{backend}-{dtype_name}-{'x'.join(map(str, shape))}")


@pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")
@pytest.mark.parametrize("shape, dtype_name, backend", list(gpu_cases()))
def test_global_avg_pool_gpu(benchmark, copy_bandwidth, shape, dtype_name, backend):
    import triton.testing

    dtype = DTYPES[dtype_name]
    x = make_input(shape, dtype, "cuda")
    assert_close_to_reference(ops.global_avg_pool(x, backend=backend), reference_global_avg_pool(x), "elementwise")

    def run():
        ops.global_avg_pool(x, backend=backend)
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=10, rounds=50)
    ms = triton.testing.do_bench(lambda: ops.global_avg_pool(x, backend=backend), warmup=25, rep=100)
    ms_torch = triton.testing.do_bench(lambda: ops.global_avg_pool(x, backend="torch"), warmup=25, rep=100)
    traffic = (x.numel() + shape[0] * shape[1]) * x.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype=dtype_name, backend=backend, shape=list(shape),
        ms=ms, gbps=traffic / (ms * 1e-3) / 1e9, copy_gbps=copy_bandwidth / 1e9,
        fraction_of_copy_bandwidth=traffic / (ms * 1e-3) / copy_bandwidth, speedup_vs_torch=ms_torch / ms,
    )


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_global_avg_pool_cpu_smoke(benchmark, shape):
    x = make_input(shape, torch.float32, "cpu")
    out = benchmark(ops.global_avg_pool, x, backend="torch")
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")
    benchmark.extra_info.update(device="cpu", backend="torch", dtype="fp32", shape=list(shape))
