"""add_relu: every backend against a float64 reference, layouts, special values, bad inputs."""
import math

import pytest
import torch

from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels.add_relu import add_relu as add_relu_triton
from cnnfast.triton_kernels.add_relu import add_relu_flat_configs, add_relu_strided_configs
from tests.test_global_avg_pool import (
    INTERPRETER_ONLY, LAYOUTS, forbid_triton, make_input, triton_config_cases, unwritten_reads_nan,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, C, H, W): residual adds of ResNet blocks at batch 1-2 (stages 2-5 of ResNet-18/34 and
# ResNet-50+), then odd ones: C=3, primes, H != W, 1x1, a single element, batch 0.
SHAPES = [
    (2, 256, 14, 14), (1, 64, 56, 56), (2, 512, 7, 7), (1, 2048, 7, 7), (1, 3, 5, 5),
    (3, 13, 7, 5), (2, 257, 3, 3), (2, 8, 1, 1), (1, 1, 1, 1), (0, 16, 4, 4),
]
# (x layout, y layout): equal dense layouts take the flat kernel, the rest the strided one.
LAYOUT_PAIRS = [(layout, layout) for layout in LAYOUTS] + [
    ("channels_last", "nchw"), ("nchw", "channels_last"), ("channel_slice", "channels_last"),
    ("expanded", "spatial_stride"), ("storage_offset", "nchw"),
]
# (backend, device)
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=INTERPRETER_ONLY),
    pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-gpu", marks=pytest.mark.gpu),
]


def reference_add_relu(x, y, relu=True):
    total = x.double() + y.double()
    return torch.relu(total) if relu else total


def run_and_check(backend, device, shape, dtype, layouts, relu=True):
    x = make_input(shape, dtype, device, layouts[0])
    y = make_input(shape, dtype, device, layouts[1])
    with unwritten_reads_nan(device):
        out = ops.add_relu(x, y, relu, backend=backend)
    assert out.dtype == dtype and out.shape == shape and out.device == x.device
    assert_close_to_reference(out, reference_add_relu(x, y, relu), "elementwise")


@pytest.mark.parametrize("relu", (True, False), ids=("relu", "no-relu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference(backend, device, shape, dtype, relu):
    torch.manual_seed(0)
    run_and_check(backend, device, shape, dtype, ("channels_last", "channels_last"), relu)


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 24, 3, 5), (3, 130, 4, 1)], ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_layouts_match_reference(backend, device, shape, dtype, layouts):
    torch.manual_seed(0)
    run_and_check(backend, device, shape, dtype, layouts)


@pytest.mark.parametrize(
    "layouts, memory_format",
    [
        (("channels_last", "channels_last"), torch.channels_last),
        (("nchw", "nchw"), torch.contiguous_format),
        (("storage_offset", "storage_offset"), torch.channels_last),
        (("nchw", "channels_last"), torch.channels_last),
        (("expanded", "expanded"), torch.channels_last),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v),
)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_output_layout(backend, device, layouts, memory_format):
    # The inputs' shared dense layout is kept (the flat path); anything else gives channels_last.
    x, y = (make_input((2, 6, 3, 4), torch.float32, device, layout) for layout in layouts)
    out = ops.add_relu(x, y, backend=backend)
    assert out.is_contiguous(memory_format=memory_format)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.cnnfast.add_relu(x, y, True, backend)
    assert fake.stride() == out.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_integer_values_exact(backend, device, dtype):
    # Integers below 256 and their sums are exact in every dtype: any indexing mistake is a mismatch.
    x = torch.randint(-100, 101, (3, 40, 5, 7), device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(-100, 101, (3, 40, 5, 7), device=device).to(dtype)  # NCHW: the strided kernel
    for a, b in ((x, x.flip(0)), (x, y)):
        with unwritten_reads_nan(device):
            out = ops.add_relu(a, b, backend=backend)
        assert_close_to_reference(out, reference_add_relu(a, b), "elementwise", exact=True)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_lazily_negated_inputs_are_read_as_their_values(backend, device):
    """z.conj().imag holds -values in memory (the negative bit), which the dispatcher resolves."""
    x = torch.view_as_complex(torch.randint(-100, 101, (2, 5, 3, 4, 2), device=device).float()).conj().imag
    y = torch.randint(-100, 101, (2, 5, 3, 4), device=device).float()
    assert x.is_neg()
    for a, b in ((x, y), (y, x)):
        out = ops.add_relu(a, b, backend=backend)
        assert_close_to_reference(out, reference_add_relu(a.resolve_neg(), b.resolve_neg()), "elementwise", exact=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("y_layout", (torch.channels_last, torch.contiguous_format), ids=("flat", "strided"))
@pytest.mark.parametrize("relu", (True, False), ids=("relu", "no-relu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_propagates_nan_and_inf(backend, device, dtype, relu, y_layout):
    # y in x's layout runs the flat kernel, in another the strided one: each has its own ReLU.
    x = torch.randn(2, 8, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 8, 3, 3, device=device).to(dtype).contiguous(memory_format=y_layout)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1], y[0, 2, 1, 1] = float("inf"), float("-inf")  # inf - inf is NaN
    x[1, 3, 2, 2] = float("-inf")  # ReLU makes it 0
    x[1, 4, 0, 2] = float("inf")
    out = ops.add_relu(x, y, relu, backend=backend)
    assert out[0, 1, 0, 0].isnan() and out[0, 2, 1, 1].isnan() and out[1, 4, 0, 2] == float("inf")
    assert out[1, 3, 2, 2] == (0 if relu else float("-inf"))
    assert_close_to_reference(out, reference_add_relu(x, y, relu), "elementwise")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_past_2_31(backend):
    # 2^31 + 2^20 bfloat16 elements each: the last elements sit past 2^31.
    shape = (1, 64, 2 ** 13 + 2 ** 2, 2 ** 12)
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=torch.channels_last).zero_()
    y = torch.zeros_like(x)
    x[:, :, -2:] = torch.randn((1, 64, 2, 2 ** 12), device="cuda").to(torch.bfloat16)
    y[:, :, -2:] = torch.randn((1, 64, 2, 2 ** 12), device="cuda").to(torch.bfloat16)
    out = ops.add_relu(x, y, backend=backend)
    assert_close_to_reference(out[:, :, -2:], reference_add_relu(x[:, :, -2:], y[:, :, -2:]), "elementwise")
    assert not out[:, :, :-2].any()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_current_stream(backend):
    x, y = (make_input((8, 256, 14, 14), torch.float16, "cuda") for _ in range(2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(stream):
        out = ops.add_relu(x, y, backend=backend)
    stream.synchronize()
    assert_close_to_reference(out, reference_add_relu(x, y), "elementwise")


# ---------------------------------------------------------------- the Triton kernels themselves


@pytest.mark.parametrize("device, config", triton_config_cases(add_relu_flat_configs))
@pytest.mark.parametrize("layout", ("channels_last", "nchw", "storage_offset"))
def test_triton_flat_every_config(device, config, layout):
    x, y = (make_input((3, 130, 5, 7), torch.float32, device, layout) for _ in range(2))
    out = torch.full_like(x, float("nan"))  # an element the kernel never writes stays NaN
    add_relu_triton(x, y, out, relu=True, config=config)
    assert_close_to_reference(out, reference_add_relu(x, y), "elementwise")


@pytest.mark.parametrize("device, config", triton_config_cases(add_relu_strided_configs))
@pytest.mark.parametrize("layouts", [("channels_last", "nchw"), ("channel_slice", "expanded")], ids="-".join)
def test_triton_strided_every_config(device, config, layouts):
    x, y = (make_input((3, 130, 5, 7), torch.float32, device, layout) for layout in layouts)
    out = torch.full(x.shape, float("nan"), device=device).contiguous(memory_format=torch.channels_last)
    add_relu_triton(x, y, out, relu=False, config=config)
    assert_close_to_reference(out, reference_add_relu(x, y, relu=False), "elementwise")


@pytest.mark.parametrize("device, config", triton_config_cases(add_relu_flat_configs))
def test_triton_flat_writes_nothing_past_the_output(device, config):
    # An odd element count leaves the last block partly masked; the output ends inside a larger buffer.
    shape = (2, 257, 3, 3)
    x, y = (torch.randn(shape, device=device) for _ in range(2))
    buffer = torch.full((math.prod(shape) + 4096,), 7.0, device=device)  # 7.0 past the output
    out = buffer[:math.prod(shape)].view(shape).fill_(math.nan)
    add_relu_triton(x, y, out, relu=True, config=config)
    assert_close_to_reference(out, reference_add_relu(x, y), "elementwise")
    assert (buffer[math.prod(shape):] == 7.0).all()


@pytest.mark.parametrize("interpreted", [True, False], ids=["interpreter-configs", "gpu-configs"])
def test_triton_strided_grid_fits_cuda_limits(interpreted):
    """Millions of channels (legal, if odd) still launch: CUDA caps grid axes 1 and 2 at 65535 blocks,
    which the interpreter does not enforce, so the strided kernel's grid is one axis."""
    from cnnfast.triton_kernels.add_relu import add_relu_strided_kernel, launch_plan

    shape = (1, 3_000_000, 2, 1)
    x = torch.empty(shape, device="meta")  # NCHW beside channels_last: the strided kernel
    y = torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last)
    kernel, _, _, grid, _ = launch_plan(x, y, torch.empty_like(y), True, None)
    assert kernel is add_relu_strided_kernel
    for config in add_relu_strided_configs(interpreted):
        blocks = grid(config.kwargs)
        assert blocks[0] < 2 ** 31 and all(b <= 65535 for b in blocks[1:]), (config, blocks)
        tiles = -(-2 // config.kwargs["BLOCK_M"]) * -(-3_000_000 // config.kwargs["BLOCK_C"])
        assert math.prod(blocks) == tiles, (config, blocks)  # one program per (pixel, channel) tile


@pytest.mark.parametrize("device, config", triton_config_cases(add_relu_strided_configs))
@pytest.mark.parametrize("residual", [False, True], ids=["bias", "bias-residual"])
def test_triton_conv_epilogue_every_config(device, config, residual):
    """The strided kernel as torch_triton's conv epilogue: a strided float32 bias per channel, a
    residual or none, ReLU, written in place over x (the convolution's result)."""
    x, y = (make_input((3, 130, 5, 7), torch.bfloat16, device, "channels_last") for _ in range(2))
    bias = torch.randn(2 * 130, device=device)[::2]
    expected = torch.relu(x.double() + bias.double().view(1, -1, 1, 1) + (y.double() if residual else 0))
    add_relu_triton(x, y if residual else None, x, relu=True, config=config, bias=bias)
    assert_close_to_reference(x, expected, "elementwise")


@INTERPRETER_ONLY
def test_triton_backend_runs_triton(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the triton backend called PyTorch's add or relu")

    for name in ("add", "relu", "relu_"):
        monkeypatch.setattr(torch, name, forbidden)
    x, y = (make_input((2, 24, 3, 5), torch.float32, "cpu") for _ in range(2))
    out = ops.add_relu(x, y, backend="triton")
    assert_close_to_reference(out, (x.double() + y.double()).clamp(min=0), "elementwise")


# ---------------------------------------------------------------- custom op plumbing


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[:2])
def test_torch_compile_fullgraph_traces_the_op(backend, device):
    fn = torch.compile(lambda a, b: ops.add_relu(a, b, backend=backend) * 2, fullgraph=True, backend="eager")
    x, y = (make_input((2, 6, 3, 4), torch.float32, device) for _ in range(2))
    assert_close_to_reference(fn(x, y), 2 * reference_add_relu(x, y), "elementwise")


def test_default_backend_on_cpu_is_torch(monkeypatch):
    forbid_triton(monkeypatch)
    x, y = (make_input((2, 5, 3, 3), torch.float32, "cpu") for _ in range(2))
    assert_close_to_reference(ops.add_relu(x, y), reference_add_relu(x, y), "elementwise")


# ---------------------------------------------------------------- the bad-input contract


def zeros(*shape, **kwargs):
    return torch.zeros(shape, **kwargs)


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (zeros(2, 3, 4), zeros(2, 3, 4), ValueError, "4-D"),
        (zeros(2, 3, 4, 4), zeros(2, 3, 4, 5), ValueError, r"y must have x's shape \(2, 3, 4, 4\)"),
        (zeros(2, 3, 4, 4), zeros(1, 3, 4, 4), ValueError, "y must have x's shape"),  # no broadcasting
        (zeros(2, 3, 4, 4, dtype=torch.int32), zeros(2, 3, 4, 4), TypeError, "x has dtype torch.int32"),
        (zeros(2, 3, 4, 4), zeros(2, 3, 4, 4, dtype=torch.bool), TypeError, "y has dtype torch.bool"),
        (zeros(2, 3, 4, 4, dtype=torch.complex64), zeros(2, 3, 4, 4), TypeError, "dtype torch.complex64"),
        (zeros(2, 3, 4, 4), zeros(2, 3, 4, 4, dtype=torch.float16), TypeError, "y dtype torch.float16 differ"),
        (zeros(2, 3, 4, 4), zeros(2, 3, 4, 4, device="meta"), RuntimeError, "one device"),
        (zeros(2, 3, 4, 4), [[1.0]], TypeError, "y must be a torch.Tensor"),
        (zeros(2, 3, 4, 4), None, TypeError, "y must be a torch.Tensor, got NoneType"),
    ],
    ids=["rank", "shape", "broadcast", "int", "bool", "complex", "dtype-mismatch", "device-mismatch", "not-tensor",
         "none"],
)
def test_bad_input(x, y, error, match):
    with pytest.raises(error, match=match):
        ops.add_relu(x, y)


def test_requires_grad_rejected():
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.add_relu(zeros(1, 2, 3, 3), zeros(1, 2, 3, 3, requires_grad=True))


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.add_relu(zeros(1, 2, 3, 3), zeros(1, 2, 3, 3), backend="cudnn")


def test_cuda_backend_on_cpu_tensor_raises():
    with pytest.raises(RuntimeError, match="add_relu: backend 'cuda' needs CUDA tensors"):
        ops.add_relu(zeros(1, 2, 3, 3), zeros(1, 2, 3, 3), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_extension_kernel_without_gpu_raises_clearly():
    from cnnfast.backends import cuda_extension

    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_extension().add_relu(16, 16, 16, 0, (1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1), True, 0)
