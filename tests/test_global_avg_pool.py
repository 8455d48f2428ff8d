"""global_avg_pool: every backend against a float64 reference, layouts, special values, bad inputs."""
import math

import pytest
import torch

from cnnfast import ops
from cnnfast.backends import cuda_extension
from cnnfast.testing import assert_close_to_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W): the real GAP inputs (GoogLeNet 1024x7x7, ResNet-18/34 512x7x7, ResNet-50+ 2048x7x7),
# then odd ones: C=3, C not a multiple of any vector width, H != W, primes, 1x1, a large map, batch 0.
SHAPES = [
    (2, 1024, 7, 7), (3, 512, 7, 7), (2, 2048, 7, 7), (1, 3, 5, 5), (4, 13, 3, 7),
    (3, 257, 11, 13), (2, 8, 1, 1), (1, 64, 56, 56), (5, 40, 2, 3), (0, 16, 4, 4),
]


def reference_global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.double().mean(dim=(2, 3))


def make_input(shape, dtype, device, layout="channels_last"):
    """A random input in one of several memory layouts that all hold the same logical values."""
    n, c, h, w = shape
    if layout == "channels_last":
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "channel_slice":  # channels_last storage, a slice of channels starting at 1 (misaligned)
        big = torch.randn((n, c + 3, h, w), device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        return big[:, 1 : c + 1]
    if layout == "spatial_stride":  # every other pixel
        return torch.randn((n, c, 2 * h, 2 * w), device=device).to(dtype)[:, :, ::2, ::2]
    if layout == "expanded":  # one image broadcast over the batch (batch stride 0)
        return torch.randn((1, c, h, w), device=device).to(dtype).expand(n, c, h, w)
    if layout == "storage_offset":
        flat = torch.randn(n * c * h * w + 5, device=device).to(dtype)
        return flat[5:].view(n, h, w, c).permute(0, 3, 1, 2)
    raise ValueError(layout)


LAYOUTS = ("channels_last", "nchw", "channel_slice", "spatial_stride", "expanded", "storage_offset")


def poison_cuda_cache():
    """Leaves NaN in the caching allocator's free blocks, so an output element a kernel never writes is NaN."""
    torch.full((1 << 24,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def run_and_check(backend, shape, dtype, layout, device):
    x = make_input(shape, dtype, device, layout)
    if device == "cuda":
        poison_cuda_cache()
    out = ops.global_avg_pool(x, backend=backend)
    assert out.dtype == dtype and out.shape == shape[:2] and out.device == x.device
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


# ---------------------------------------------------------------- torch backend (the CPU path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_backend_matches_reference(shape, dtype):
    torch.manual_seed(0)
    run_and_check("torch", shape, dtype, "channels_last", "cpu")


def test_default_backend_on_cpu_is_torch():
    x = make_input((2, 5, 3, 3), torch.float32, "cpu")
    assert_close_to_reference(ops.global_avg_pool(x), reference_global_avg_pool(x), "elementwise")


# ---------------------------------------------------------------- CUDA backend (needs a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_backend_matches_reference(shape, dtype, layout):
    torch.manual_seed(0)
    run_and_check("cuda", shape, dtype, layout, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_integer_values_exact(dtype):
    # Small integers and 32 pixels: every partial sum is exact and the mean is a multiple of 1/32,
    # so any indexing mistake shows as an exact mismatch.
    x = torch.randint(-8, 9, (3, 100, 4, 8), device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    poison_cuda_cache()
    out = ops.global_avg_pool(x, backend="cuda")
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_propagates_nan_and_inf(dtype):
    x = torch.randn(2, 24, 5, 5, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")
    x[1, 7, 0, 4] = float("inf")
    x[1, 8, 0, 4], x[1, 8, 1, 1] = float("inf"), float("-inf")
    out = ops.global_avg_pool(x, backend="cuda")
    assert torch.isnan(out[0, 3]) and math.isinf(out[1, 7].item()) and torch.isnan(out[1, 8])
    torch.testing.assert_close(out.double(), torch.mean(x.double(), dim=(2, 3)).to(dtype).double(), equal_nan=True,
                               rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_cuda_large_map_error_no_worse_than_pytorch():
    # 1 x 64 x 224 x 224 in bfloat16: our error against float64 is at most twice PyTorch's own.
    x = torch.rand(1, 64, 224, 224, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = reference_global_avg_pool(x)
    ours = (ops.global_avg_pool(x, backend="cuda").double() - ref).abs().max().item()
    theirs = (torch.mean(x, dim=(2, 3)).double() - ref).abs().max().item()
    assert ours <= 2 * theirs + 1e-12


@pytest.mark.gpu
def test_cuda_runs_on_current_stream():
    x = make_input((4, 2048, 7, 7), torch.float16, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.global_avg_pool(x, backend="cuda")
    stream.synchronize()
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


@pytest.mark.gpu
def test_cuda_repeatable_bitwise():
    x = make_input((8, 2048, 7, 7), torch.bfloat16, "cuda")
    first = ops.global_avg_pool(x, backend="cuda")
    for _ in range(20):
        assert torch.equal(first, ops.global_avg_pool(x, backend="cuda"))


# ---------------------------------------------------------------- the extension without a GPU


def test_extension_imports_and_reports_build():
    info = cuda_extension().build_info()
    assert "global_avg_pool" in info["ops"]
    assert info["architectures"] and info["cuda_version"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_extension_kernel_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_extension().global_avg_pool(1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0)


def test_extension_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-empty H x W"):
        cuda_extension().global_avg_pool(1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="unknown dtype code"):
        cuda_extension().global_avg_pool(1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0)


# ---------------------------------------------------------------- custom op plumbing


def test_torch_compile_fullgraph_traces_the_op():
    fn = torch.compile(lambda t: ops.global_avg_pool(t) * 2, fullgraph=True, backend="eager")
    x = make_input((2, 6, 3, 4), torch.float32, "cpu")
    assert_close_to_reference(fn(x), 2 * reference_global_avg_pool(x), "elementwise")


def test_fake_tensor_shape():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(3, 10, 4, 4)
        out = torch.ops.cnnfast.global_avg_pool(x, "torch")
    assert out.shape == (3, 10)


# ---------------------------------------------------------------- the bad-input contract


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(2, 3, 4), ValueError, "4-D"),
        (torch.zeros(2, 3, 0, 4), ValueError, "H and W must be non-empty"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int32), TypeError, "dtype torch.int32"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.bool), TypeError, "dtype torch.bool"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.complex64), TypeError, "dtype torch.complex64"),
        ([[1.0]], TypeError, "must be a torch.Tensor"),
    ],
    ids=["rank", "empty-hw", "int", "bool", "complex", "not-tensor"],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        ops.global_avg_pool(x)


def test_requires_grad_rejected():
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.global_avg_pool(torch.zeros(1, 2, 3, 3, requires_grad=True))


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.global_avg_pool(torch.zeros(1, 2, 3, 3), backend="cudnn")


def test_cuda_backend_on_cpu_tensor_raises():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.global_avg_pool(torch.zeros(1, 2, 3, 3), backend="cuda")
