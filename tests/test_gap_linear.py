"""gap_linear: every backend against a float64 reference, layouts, special values, bad inputs."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnfast import ops
from cnnfast.backends import cuda_extension
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels.gap_linear import gap_linear as gap_linear_triton
from cnnfast.triton_kernels.gap_linear import linear_bias_configs
from tests.test_global_avg_pool import (
    INTERPRETER_ONLY, LAYOUTS, forbid_triton, make_input, triton_config_cases, unwritten_reads_nan,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W, out_features): the ImageNet heads (ResNet-18/34 512, GoogLeNet 1024, ResNet-50+
# 2048 channels, 7x7, 1000 classes) at batch 1 or with fewer classes (the interpreter is slow), then
# odd ones: N past one 16-row block, C=3, primes, H != W, 1x1, one output, batch 0.
SHAPES = [
    (1, 512, 7, 7, 1000), (2, 1024, 7, 7, 100), (2, 2048, 7, 7, 10), (17, 40, 2, 2, 33), (1, 3, 5, 5, 7),
    (3, 37, 3, 5, 11), (2, 16, 1, 1, 10), (2, 8, 4, 4, 1), (0, 32, 7, 7, 10),
]
# The full heads at real batch sizes, on a GPU; then batches on each side of the CUDA kernel's
# switch from its few-rows kernel to its tensor-core tiles (32), with C not a multiple of 8 (the
# unvectorized staging) and out_features not a multiple of the 64-wide tile.
GPU_SHAPES = [(256, 2048, 7, 7, 1000), (64, 1024, 7, 7, 1000), (8, 512, 7, 7, 1000), (32, 36, 3, 5, 77),
              (45, 36, 3, 5, 77), (200, 64, 2, 3, 130)]
# (backend, device)
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=INTERPRETER_ONLY),
    pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-gpu", marks=pytest.mark.gpu),
]
GPU_BACKENDS = ("triton", "cuda")


def reference_gap_linear(x, weight, bias=None):
    out = x.double().mean(dim=(2, 3)) @ weight.double().t()
    return out if bias is None else out + bias.double()


def make_head(shape, dtype, device, bias_dtype="x"):
    """weight (out_features, C) scaled so outputs are O(1), and bias in float32, x's dtype or None."""
    n, c, h, w, out_features = shape
    weight = (torch.randn(out_features, c, device=device) / max(c, 1) ** 0.5).to(dtype)
    if bias_dtype is None:
        return weight, None
    return weight, torch.randn(out_features, device=device).to(dtype if bias_dtype == "x" else bias_dtype)


def run_and_check(backend, device, shape, dtype, layout="channels_last", bias_dtype="x"):
    x = make_input(shape[:4], dtype, device, layout)
    weight, bias = make_head(shape, dtype, device, bias_dtype)
    with unwritten_reads_nan(device):
        out = ops.gap_linear(x, weight, bias, backend=backend)
    assert out.dtype == dtype and out.shape == (shape[0], shape[4]) and out.device == x.device
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference(backend, device, shape, dtype):
    torch.manual_seed(0)
    run_and_check(backend, device, shape, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_autocast_does_not_change_what_the_op_computes(backend, device, layout):
    """Under torch.autocast the op computes in its inputs' dtype, as a compiled kernel does (the
    torch backend's linear would otherwise run in bfloat16 and return it)."""
    torch.manual_seed(0)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        run_and_check(backend, device, (3, 37, 3, 5, 11), torch.float32, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_real_heads_match_reference(backend, shape, dtype):
    torch.manual_seed(0)
    run_and_check(backend, "cuda", shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 2048, 7, 7, 1000), (8, 512, 7, 7, 1000)], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_repeatable_bitwise(backend, shape):
    x = make_input(shape[:4], torch.bfloat16, "cuda")
    weight, bias = make_head(shape, torch.bfloat16, "cuda", torch.float32)
    first = ops.gap_linear(x, weight, bias, backend=backend)
    for _ in range(100):
        assert torch.equal(first, ops.gap_linear(x, weight, bias, backend=backend))


@pytest.mark.parametrize("bias_dtype", (None, torch.float32, "x"), ids=("no-bias", "fp32-bias", "x-dtype-bias"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_layouts_and_biases_match_reference(backend, device, dtype, layout, bias_dtype):
    torch.manual_seed(0)
    run_and_check(backend, device, (3, 37, 3, 5, 20), dtype, layout, bias_dtype)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_lazily_negated_inputs_are_read_as_their_values(backend, device):
    """z.conj().imag holds -values in memory (the negative bit), which the dispatcher resolves."""
    x = torch.view_as_complex(torch.randn(3, 37, 3, 5, 2, device=device)).conj().imag
    weight = torch.view_as_complex(torch.randn(20, 37, 2, device=device)).conj().imag
    bias = torch.view_as_complex(torch.randn(20, 2, device=device)).conj().imag
    out = ops.gap_linear(x, weight, bias, backend=backend)
    assert_close_to_reference(out, reference_gap_linear(x.resolve_neg(), weight.resolve_neg(), bias.resolve_neg()),
                              "conv")


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_strided_weight_and_bias(backend, device):
    # weight stored transposed (C, out_features) and a bias that is every other element of a vector.
    x = make_input((3, 37, 3, 5), torch.float32, device)
    weight = torch.randn(37, 20, device=device).t()
    bias = torch.randn(40, device=device)[::2]
    out = ops.gap_linear(x, weight, bias, backend=backend)
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")


@pytest.mark.parametrize("batch", (17, 45))  # the CUDA head's few-rows kernel, then its tensor-core tiles
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_integer_values_exact(backend, device, dtype, batch):
    # Values in {-1, 0, 1} over 2x2 pixels: means are quarters, |out| <= 41, every sum is exact in
    # every dtype, so any indexing mistake shows as an exact mismatch.
    x = torch.randint(-1, 2, (batch, 40, 2, 2), device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-1, 2, (33, 40), device=device).to(dtype)
    bias = torch.randint(-1, 2, (33,), device=device).to(dtype)
    with unwritten_reads_nan(device):
        out = ops.gap_linear(x, weight, bias, backend=backend)
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv", exact=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_propagates_nan_and_inf(backend, device, dtype):
    x = torch.randn(3, 24, 5, 5, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")
    x[1, 7, 0, 4] = float("inf")
    weight, bias = make_head((3, 24, 5, 5, 10), dtype, device)
    out = ops.gap_linear(x, weight, bias, backend=backend)
    assert out[0].isnan().all() and out[1].isinf().all() and out[2].isfinite().all()
    assert torch.equal(out[1].sign(), weight[:, 7].sign())
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_offsets_past_2_31(backend):
    # 700 x 64 x 224 x 224 = 2.25e9 elements: the last images start past 2^31 elements.
    x = torch.empty((700, 64, 224, 224), dtype=torch.bfloat16, device="cuda", memory_format=torch.channels_last).zero_()
    x[-2:] = torch.randn((2, 64, 224, 224), device="cuda").to(torch.bfloat16)
    weight, bias = make_head((700, 64, 224, 224, 10), torch.bfloat16, "cuda")
    out = ops.gap_linear(x, weight, bias, backend=backend)
    assert_close_to_reference(out[-2:], reference_gap_linear(x[-2:], weight, bias), "conv")
    assert torch.equal(out[:-2], bias.expand(698, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_runs_on_current_stream(backend):
    x = make_input((8, 2048, 7, 7), torch.float16, "cuda")
    weight, bias = make_head((8, 2048, 7, 7, 1000), torch.float16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(stream):
        out = ops.gap_linear(x, weight, bias, backend=backend)
    stream.synchronize()
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")


# ---------------------------------------------------------------- the Triton kernel itself


def linear_bias_config_cases():
    """(device, config, dtype): every config of the product's float32 and 16-bit sets, in its dtype."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        configs = functools.partial(linear_bias_configs, float32=dtype == torch.float32)
        cases += [pytest.param(*case.values, dtype, id=f"{case.id}-{str(dtype)[6:]}", marks=case.marks)
                  for case in triton_config_cases(configs)]
    return cases


@pytest.mark.parametrize("device, config, dtype", linear_bias_config_cases())
def test_triton_every_config(device, config, dtype):
    # N, C, H*W and out_features that no block size divides, so every mask is exercised.
    shape = (17, 40, 3, 5, 33)
    x = make_input(shape[:4], dtype, device, "nchw")
    weight, bias = make_head(shape, dtype, device, torch.float32)
    with unwritten_reads_nan(device):
        out = gap_linear_triton(x, weight, bias, config=config)
    assert_close_to_reference(out, reference_gap_linear(x, weight, bias), "conv")


@INTERPRETER_ONLY
def test_triton_backend_runs_triton(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the triton backend called PyTorch's mean or linear")

    monkeypatch.setattr(torch, "mean", forbidden)
    monkeypatch.setattr(F, "linear", forbidden)
    x = make_input((3, 37, 3, 5), torch.float32, "cpu")
    weight, bias = make_head((3, 37, 3, 5, 20), torch.float32, "cpu")
    out = ops.gap_linear(x, weight, bias, backend="triton")
    expected = (x.double().sum(dim=(2, 3)) / 15) @ weight.double().t() + bias.double()
    assert_close_to_reference(out, expected, "conv")


# ---------------------------------------------------------------- custom op plumbing


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[:2])
def test_torch_compile_fullgraph_traces_the_op(backend, device):
    fn = torch.compile(lambda t, w, b: ops.gap_linear(t, w, b, backend=backend) * 2, fullgraph=True, backend="eager")
    x = make_input((2, 6, 3, 4), torch.float32, device)
    weight, bias = make_head((2, 6, 3, 4, 5), torch.float32, device)
    assert_close_to_reference(fn(x, weight, bias), 2 * reference_gap_linear(x, weight, bias), "conv")


def test_fake_tensor_shape():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        out = torch.ops.cnnfast.gap_linear(torch.empty(3, 10, 4, 4), torch.empty(7, 10), None, "torch")
    assert out.shape == (3, 7)


def test_flop_counter_counts_the_linear_layer():
    # 2 * N * C * out_features, what FlopCounterMode counts for PyTorch's own mean -> linear head.
    x = torch.randn(4, 64, 7, 7)
    weight, bias = make_head((4, 64, 7, 7, 10), torch.float32, "cpu")
    with FlopCounterMode(display=False) as ours:
        ops.gap_linear(x, weight, bias)
    with FlopCounterMode(display=False) as theirs:
        F.linear(x.mean(dim=(2, 3)), weight, bias)
    assert ours.get_total_flops() == theirs.get_total_flops() == 2 * 4 * 64 * 10


def test_default_backend_on_cpu_is_torch(monkeypatch):
    forbid_triton(monkeypatch)
    x = make_input((2, 5, 3, 3), torch.float32, "cpu")
    weight, bias = make_head((2, 5, 3, 3, 4), torch.float32, "cpu")
    assert_close_to_reference(ops.gap_linear(x, weight, bias), reference_gap_linear(x, weight, bias), "conv")


# ---------------------------------------------------------------- the bad-input contract


def zeros(*shape, **kwargs):
    return torch.zeros(shape, **kwargs)


@pytest.mark.parametrize(
    "x, weight, bias, error, match",
    [
        (zeros(2, 6, 4), zeros(10, 6), None, ValueError, "4-D"),
        (zeros(2, 6, 0, 4), zeros(10, 6), None, ValueError, "H and W must be non-empty"),
        (zeros(2, 6, 4, 4), zeros(6), None, ValueError, "2-D"),
        (zeros(2, 8, 4, 4), zeros(10, 6), None, ValueError, r"input has 8 channels, but weight \(10, 6\) expects 6"),
        (zeros(2, 6, 4, 4), zeros(10, 6), zeros(9), ValueError, r"bias must have shape \(10,\)"),
        (zeros(2, 6, 4, 4), zeros(10, 6), zeros(11), ValueError, r"bias must have shape \(10,\), got \(11,\)"),
        (zeros(2, 6, 4, 4), zeros(10, 6), zeros(1, 10), ValueError, r"bias must have shape \(10,\)"),
        (zeros(2, 6, 4, 4, dtype=torch.int64), zeros(10, 6), None, TypeError, "x has dtype torch.int64"),
        (zeros(2, 6, 4, 4), zeros(10, 6, dtype=torch.bool), None, TypeError, "weight has dtype torch.bool"),
        (zeros(2, 6, 4, 4), zeros(10, 6), zeros(10, dtype=torch.complex64), TypeError, "bias has dtype torch.complex"),
        (zeros(2, 6, 4, 4), zeros(10, 6, dtype=torch.bfloat16), None, TypeError, "weight dtype torch.bfloat16 differ"),
        (zeros(2, 6, 4, 4, dtype=torch.bfloat16), zeros(10, 6, dtype=torch.bfloat16), zeros(10, dtype=torch.float16),
         TypeError, "bias dtype torch.float16 must be float32 or the input's torch.bfloat16"),
        (zeros(2, 6, 4, 4), zeros(10, 6, device="meta"), None, RuntimeError, "one device"),
        (zeros(2, 6, 4, 4), zeros(10, 6), zeros(10, device="meta"), RuntimeError, "one device"),
        ([[1.0]], zeros(10, 6), None, TypeError, "x must be a torch.Tensor"),
        (zeros(2, 6, 4, 4), None, None, TypeError, "weight must be a torch.Tensor, got NoneType"),
    ],
    ids=[
        "rank", "empty-hw", "weight-rank", "channels", "bias-length", "bias-too-long", "bias-rank", "int", "bool", "complex",
        "weight-dtype", "bias-dtype", "weight-device", "bias-device", "not-tensor", "no-weight",
    ],
)
def test_bad_input(x, weight, bias, error, match):
    with pytest.raises(error, match=match):
        ops.gap_linear(x, weight, bias)


def test_requires_grad_rejected():
    # An nn.Linear's weight outside torch.no_grad(), the usual way to get here.
    weight = torch.nn.Linear(6, 10).weight
    with pytest.raises(RuntimeError, match="weight requires grad"):
        ops.gap_linear(zeros(2, 6, 3, 3), weight)


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.gap_linear(zeros(2, 6, 3, 3), zeros(10, 6), backend="cudnn")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(RuntimeError, match="gap_linear: backend 'cuda' needs CUDA tensors"):
        ops.gap_linear(zeros(2, 6, 3, 3), zeros(10, 6), backend="cuda")


# ---------------------------------------------------------------- the extension without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_extension_kernel_without_gpu_raises_clearly():
    assert "gap_linear" in cuda_extension().build_info()["ops"]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_extension().gap_linear(16, 16, 0, 16, 16, 1, 2, 8, 7, 7, 10, 392, 1, 56, 8, 0)


@pytest.mark.parametrize(
    "args, match",
    [((16, 16, 0, 16, 16, 1, 2, 8, 0, 7, 10, 392, 1, 56, 8, 0), "non-empty H x W"),
     ((16, 16, 0, 16, 16, 9, 2, 8, 7, 7, 10, 392, 1, 56, 8, 0), "unknown dtype code"),
     ((16, 16, 0, 16, 16, 1, 2, 8, 7, 7, -1, 392, 1, 56, 8, 0), "O must be >= 0"),
     ((16, 0, 0, 16, 16, 1, 2, 8, 7, 7, 10, 392, 1, 56, 8, 0), "weight is a null pointer")],
    ids=["empty-hw", "dtype", "negative-O", "null-weight"],
)
def test_extension_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        cuda_extension().gap_linear(*args)
