"""global_avg_pool: every backend against a float64 reference, layouts, special values, bad inputs.

Also home of the helpers the other memory-bound ops' tests share: inputs in many layouts, the
(backend, device) pairs to run, NaN-poisoning of the CUDA cache, per-config test cases."""
import contextlib
import math

import pytest
import torch

from cnnfast import backends, ops
from cnnfast.backends import TRITON_INTERPRETED, cuda_extension
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels.global_avg_pool import global_avg_pool as global_avg_pool_triton
from cnnfast.triton_kernels.global_avg_pool import global_avg_pool_configs

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
# Small odd shapes every layout is tried on (without a GPU the interpreter is slow).
LAYOUT_SHAPES = [(2, 24, 3, 5), (1, 3, 2, 2), (3, 130, 4, 1)]

INTERPRETER_ONLY = pytest.mark.skipif(
    not TRITON_INTERPRETED, reason="Triton runs CPU tensors only under TRITON_INTERPRET=1"
)
# (backend, device): a CPU runs PyTorch and Triton's interpreter, a GPU the compiled kernels.
CPU_BACKENDS = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=INTERPRETER_ONLY),
]
TRITON_GPU = pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.gpu)
GPU_BACKENDS = [pytest.param("cuda", "cuda", id="cuda-gpu", marks=pytest.mark.gpu), TRITON_GPU]


def triton_config_cases(configs):
    """(device, config) cases for every config of a kernel: the interpreter's set on the CPU, the GPU's on a GPU."""
    cases = [pytest.param("cpu", c, id=f"cpu-{i}", marks=INTERPRETER_ONLY) for i, c in enumerate(configs(True))]
    cases += [pytest.param("cuda", c, id=f"gpu-{i}", marks=pytest.mark.gpu) for i, c in enumerate(configs(False))]
    return cases


def poison_cuda_cache():
    """Leaves NaN in the caching allocator's free blocks, so an output element a kernel never writes is NaN.

    Cached blocks are released first; then NaN tensors fill fresh segments of both pools (blocks
    over 1 MB come from the large pool, smaller ones from 2 MB segments of the small pool)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.full((1 << 24,), float("nan"), device="cuda")
    [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(8)]
    torch.cuda.synchronize()


@contextlib.contextmanager
def unwritten_reads_nan(device):
    """For the block, an output the op allocates reads NaN where its kernel writes nothing: on a
    GPU, NaN left in the caching allocator's free blocks (poison_cuda_cache); on the CPU, whose
    fresh pages read zero (what a ReLU would give), torch.empty, torch.empty_like and
    Tensor.new_empty return floating tensors filled with NaN."""
    if torch.device(device).type == "cuda":
        poison_cuda_cache()
        yield
        return

    def nan_filled(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t
        return allocate_nan

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
            patch.setattr(owner, name, nan_filled(getattr(owner, name)))
        yield


def forbid_triton(monkeypatch):
    """Every Triton launcher the ops call raises, so a call meant for another backend fails if it
    reaches Triton (under the interpreter the numbers alone would not tell)."""
    from cnnfast.triton_kernels import add_relu, conv2d, gap_linear, global_avg_pool

    def launched(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    for module, name in ((conv2d, "conv2d_bias_act"), (add_relu, "add_relu"), (gap_linear, "gap_linear"),
                         (global_avg_pool, "global_avg_pool")):
        monkeypatch.setattr(module, name, launched)


def run_and_check(backend, shape, dtype, layout, device):
    x = make_input(shape, dtype, device, layout)
    with unwritten_reads_nan(device):
        out = ops.global_avg_pool(x, backend=backend)
    assert out.dtype == dtype and out.shape == shape[:2] and out.device == x.device
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


# ---------------------------------------------------------------- every backend against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS + [TRITON_GPU])
def test_matches_reference(backend, device, shape, dtype):
    torch.manual_seed(0)
    run_and_check(backend, shape, dtype, "channels_last", device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS + [TRITON_GPU])
def test_layouts_match_reference(backend, device, shape, dtype, layout):
    torch.manual_seed(0)
    run_and_check(backend, shape, dtype, layout, device)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_every_shape_and_layout(shape, dtype, layout):
    # Triton gets every shape in channels_last and every layout on small shapes (above): a new
    # layout is a new Triton compilation, and device_check.sh has minutes for all GPU tests.
    torch.manual_seed(0)
    run_and_check("cuda", shape, dtype, layout, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, vector", [(torch.bfloat16, 8), (torch.float32, 4)], ids=str)
def test_cuda_vector_path_takes_a_one_pixel_map_whatever_its_strides(dtype, vector):
    """An NCHW N x C x 1 x 1 tensor (strides C, 1, 1, 1): the kernel never steps H or W, so it
    takes the 16-byte vector path (the profiler names the instantiation that ran)."""
    x = torch.randn(4, 64, 1, 1, device="cuda").to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        out = ops.global_avg_pool(x, backend="cuda")
        torch.cuda.synchronize()
    # The CUDA kernels' names are templates ("...global_avg_pool_nhwc_kernel<__nv_bfloat16, 8>(...)");
    # the op's own event ("cnnfast::global_avg_pool") is not one.
    ran = [event.name for event in profile.events() if "global_avg_pool" in event.name and "kernel<" in event.name]
    assert ran and all("global_avg_pool_nhwc_kernel" in name and f", {vector}>" in name for name in ran), ran
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


def test_default_backend_on_cpu_is_torch(monkeypatch):
    forbid_triton(monkeypatch)
    x = make_input((2, 5, 3, 3), torch.float32, "cpu")
    assert_close_to_reference(ops.global_avg_pool(x), reference_global_avg_pool(x), "elementwise")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS + GPU_BACKENDS)
def test_integer_values_exact(backend, device, dtype):
    # Small integers and 32 pixels: every partial sum is exact and the mean is a multiple of 1/32,
    # so any indexing mistake shows as an exact mismatch.
    x = torch.randint(-8, 9, (3, 100, 4, 8), device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    with unwritten_reads_nan(device):
        out = ops.global_avg_pool(x, backend=backend)
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise", exact=True)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS + GPU_BACKENDS)
def test_lazily_negated_input_is_read_as_its_values(backend, device):
    """z.conj().imag holds -values in memory (the negative bit), which the dispatcher resolves."""
    x = torch.randint(-8, 9, (2, 6, 4, 4, 2), device=device).float()
    x = torch.view_as_complex(x).conj().imag
    assert x.is_neg()
    out = ops.global_avg_pool(x, backend=backend)
    assert_close_to_reference(out, reference_global_avg_pool(x.resolve_neg()), "elementwise", exact=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS + GPU_BACKENDS)
def test_propagates_nan_and_inf(backend, device, dtype):
    x = torch.randn(2, 24, 5, 5, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")
    x[1, 7, 0, 4] = float("inf")
    x[1, 8, 0, 4], x[1, 8, 1, 1] = float("inf"), float("-inf")
    out = ops.global_avg_pool(x, backend=backend)
    assert torch.isnan(out[0, 3]) and math.isinf(out[1, 7].item()) and torch.isnan(out[1, 8])
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


@pytest.mark.gpu
@pytest.mark.parametrize("memory_format", (torch.channels_last, torch.contiguous_format), ids=("nhwc", "nchw"))
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_large_map_error_no_worse_than_pytorch(backend, memory_format):
    # 1 x 64 x 224 x 224 in bfloat16: our error against float64 is at most twice PyTorch's own.
    x = torch.rand(1, 64, 224, 224, device="cuda").to(torch.bfloat16).contiguous(memory_format=memory_format)
    ref = reference_global_avg_pool(x)
    ours = (ops.global_avg_pool(x, backend=backend).double() - ref).abs().max().item()
    theirs = (torch.mean(x, dim=(2, 3)).double() - ref).abs().max().item()
    assert ours <= 2 * theirs + 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_runs_on_current_stream(backend):
    x = make_input((4, 2048, 7, 7), torch.float16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(stream):
        out = ops.global_avg_pool(x, backend=backend)
    stream.synchronize()
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_repeatable_bitwise(backend):
    x = make_input((8, 2048, 7, 7), torch.bfloat16, "cuda")
    first = ops.global_avg_pool(x, backend=backend)
    for _ in range(100):
        assert torch.equal(first, ops.global_avg_pool(x, backend=backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_offsets_past_2_31(backend):
    # 700 x 64 x 224 x 224 = 2.25e9 elements: the last images start past 2^31 elements.
    x = torch.empty((700, 64, 224, 224), dtype=torch.bfloat16, device="cuda", memory_format=torch.channels_last).zero_()
    x[-2:] = torch.randn((2, 64, 224, 224), device="cuda").to(torch.bfloat16)
    out = ops.global_avg_pool(x, backend=backend)
    assert_close_to_reference(out[-2:], reference_global_avg_pool(x[-2:]), "elementwise")
    assert not out[:-2].any()


# ---------------------------------------------------------------- the Triton kernel itself


@pytest.mark.parametrize("device, config", triton_config_cases(global_avg_pool_configs))
@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_triton_every_config(device, config, layout):
    # C and H*W that no block size divides, so every mask is exercised.
    x = make_input((3, 130, 5, 7), torch.float32, device, layout)
    with unwritten_reads_nan(device):
        out = global_avg_pool_triton(x, config=config)
    assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")


@INTERPRETER_ONLY
def test_triton_backend_runs_triton(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the triton backend called PyTorch's mean")

    monkeypatch.setattr(torch, "mean", forbidden)
    x = make_input((2, 24, 3, 5), torch.float32, "cpu")
    out = ops.global_avg_pool(x, backend="triton")
    assert_close_to_reference(out, x.double().sum(dim=(2, 3)) / 15, "elementwise")


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backends, "TRITON_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        ops.global_avg_pool(torch.zeros(1, 2, 3, 3), backend="triton")


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


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_torch_compile_fullgraph_traces_the_op(backend, device):
    fn = torch.compile(lambda t: ops.global_avg_pool(t, backend=backend) * 2, fullgraph=True, backend="eager")
    x = make_input((2, 6, 3, 4), torch.float32, device)
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
