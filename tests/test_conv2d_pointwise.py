"""The persistent TMA kernel of 1x1 stride-1 convs (cnnfast/triton_kernels/conv2d_pointwise.py),
under the interpreter and through the public op (backend="triton"): which layers it takes, its
results against float64 on many shapes and every epilogue, into channel slices, exactly on
integers, NaN through the ReLU, and the measured choice between it and the implicit GEMM."""
import pytest
import torch

from cnnfast import bench
from cnnfast.analysis import ConvProblem
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels import conv2d as conv2d_module
from cnnfast.triton_kernels import conv2d_pointwise
from tests.test_conv2d import (
    CHANNELS_LAST, EPILOGUES, NAN, Conv, check_conv2d, conv_id, in_layout, make_inputs, nan_output, reference_conv2d,
    run_conv2d,
)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Under the interpreter the kernel runs 32x32x16 tiles on a persistent grid of 4 programs.
SHAPES = [
    Conv(2, 40, 5, 7, 24, 1, 1),  # C = 40: a partial last reduction step; K = 24: a partial column tile; 6 tiles
    Conv(2, 16, 9, 11, 72, 1, 1),  # 21 tiles: each program walks five or six
    Conv(1, 128, 3, 5, 16, 1, 1),  # eight reduction steps
    Conv(1, 64, 1, 1, 40, 1, 1),  # one pixel
    Conv(3, 8, 4, 4, 8, 1, 1),  # the narrowest rows TMA takes: 8 channels of 2 bytes
]


def recorded_launches(monkeypatch, module) -> list:
    """The calls of a TMA kernel module's launcher, recorded as they pass through."""
    calls = []
    launcher = module.launch
    monkeypatch.setattr(module, "launch", lambda *args, **kwargs: calls.append(args) or launcher(*args, **kwargs))
    return calls


@pytest.fixture
def launches(monkeypatch):
    return recorded_launches(monkeypatch, conv2d_pointwise)


def layer(conv: Conv, dtype, residual=True, out_layout="channels_last", x_layout="channels_last"):
    x, weight, _, res = make_inputs(conv, dtype, residual=residual)
    out = in_layout(torch.zeros(conv.output_shape(), dtype=dtype), out_layout)
    return in_layout(x, x_layout), weight, res, out


@pytest.mark.parametrize("case, takes", [
    ("channels_last", True),
    ("float32", False),  # stays on the implicit GEMM, whose TF32 follows cuDNN's setting
    ("channels_12", False),  # 24-byte rows: not a multiple of 16 bytes
    ("stride_2", False),
    ("padding_1", False),
    ("kernel_3x3", False),
    ("nchw_input", False),
    ("storage_offset_input", False),  # 10 bytes in: a base address off the 16-byte grid
    ("expanded_input", False),
    ("nchw_out", False),
    ("aligned_channel_slice_out", True),  # pixel pitch K + 8 channels, slice from channel 8
    ("misaligned_channel_slice_out", False),  # slice from channel 3
    ("nchw_residual", False),
    ("no_residual", True),
])
def test_takes_the_layers_tma_can_address(case, takes):
    conv = Conv(2, 16, 5, 6, 24, 1, 1)
    dtype = torch.float32 if case == "float32" else torch.float16
    stride, padding = (1, 1), (0, 0)
    if case == "channels_12":
        conv = conv._replace(c=12)
    if case == "kernel_3x3":
        conv = conv._replace(r=3, s=3)
    x, weight, res, out = layer(conv, dtype, residual=case != "no_residual",
                                x_layout={"nchw_input": "nchw", "storage_offset_input": "storage_offset",
                                          "expanded_input": "expanded"}.get(case, "channels_last"),
                                out_layout="nchw" if case == "nchw_out" else "channels_last")
    if case.endswith("channel_slice_out"):
        first = 8 if case.startswith("aligned") else 3
        n, k, h, w = out.shape
        out = nan_output((n, k + 8 + first, h, w), dtype)[:, first : first + k]
    if case == "nchw_residual":
        res = res.contiguous()
    stride = (2, 2) if case == "stride_2" else stride
    padding = (1, 1) if case == "padding_1" else padding
    assert conv2d_pointwise.applies(x, weight, res, out, stride, padding, (1, 1)) == takes


def test_refuses_problems_past_int32_tile_coordinates_and_empty_ones():
    x = torch.empty(2**16, 8, 2**8, 2**7, dtype=torch.float16, device="meta")  # 2^31 pixels
    weight = torch.empty(8, 8, 1, 1, dtype=torch.float16)
    assert not conv2d_pointwise.applies(x, weight, None, x, (1, 1), (0, 0), (1, 1))
    empty = torch.empty(0, 8, 3, 3, dtype=torch.float16).contiguous(memory_format=CHANNELS_LAST)
    assert not conv2d_pointwise.applies(empty, weight, None, empty, (1, 1), (0, 0), (1, 1))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("conv", SHAPES, ids=conv_id)
def test_matches_reference(launches, conv, epilogue, dtype):
    """Every epilogue (no bias, a bias in the input's dtype or in float32, residual, ReLU) on each
    shape, against float64; into a NaN-filled out= or a new tensor, in turn (each epilogue gets
    both over the shapes)."""
    check_epilogue(conv, epilogue, dtype, into_out=(SHAPES.index(conv) + list(EPILOGUES).index(epilogue)) % 2 == 1)
    assert len(launches) == 1


def check_epilogue(conv: Conv, epilogue: str, dtype, into_out: bool):
    bias_dtype, residual, relu = EPILOGUES[epilogue]
    check_conv2d(conv, dtype, bias_dtype=dtype if bias_dtype == "input" else bias_dtype, residual=residual,
                 relu=relu, into_out=into_out)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("first", [8, 3], ids=["aligned", "misaligned"])
def test_into_a_channel_slice(launches, first, dtype):
    """Inception's branches write channel slices of one channels_last tensor: a slice on the 16-byte
    grid is written by TMA, any other by the implicit GEMM; either way exactly the slice."""
    check_into_a_channel_slice(Conv(2, 24, 5, 6, 16, 1, 1), first, dtype, launches)


def check_into_a_channel_slice(conv: Conv, first: int, dtype, launches):
    """conv with bias and ReLU into channels first.. of a NaN tensor 16 channels wider: exactly the
    slice is written, by the TMA kernel when the slice starts on the 16-byte grid."""
    torch.manual_seed(0)
    x, weight, bias, _ = make_inputs(conv, dtype, residual=False)
    n, k, h, w = conv.output_shape()
    big = nan_output((n, k + 16, h, w), dtype)
    out = big[:, first : first + k]
    assert run_conv2d(conv, x, weight, bias, relu=True, out=out) is out
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, relu=True), "conv")
    assert big[:, :first].isnan().all() and big[:, first + k :].isnan().all()
    assert len(launches) == (first == 8)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_integer_values_are_exact(launches, dtype):
    """Small integers make every product and sum exact in float32 and the result exact in the
    dtype: any element loaded twice, skipped or misplaced changes a value."""
    check_integer_values_exact(Conv(2, 40, 5, 7, 24, 1, 1), dtype, weight_limit=2)
    assert len(launches) == 1


def check_integer_values_exact(conv: Conv, dtype, weight_limit: int):
    """conv on integers (x in [-3, 3], weights in [-weight_limit, weight_limit], bias and residual
    in [-5, 5]) with ReLU, compared exactly."""
    generator = torch.Generator().manual_seed(0)

    def integers(limit, shape):
        return torch.randint(-limit, limit + 1, shape, generator=generator).to(dtype)

    x = integers(3, (conv.n, conv.c, conv.h, conv.w)).contiguous(memory_format=CHANNELS_LAST)
    weight = integers(weight_limit, (conv.k, conv.c, conv.r, conv.s)).contiguous(memory_format=CHANNELS_LAST)
    bias = integers(5, (conv.k,)).float()
    residual = integers(5, conv.output_shape()).contiguous(memory_format=CHANNELS_LAST)
    out = run_conv2d(conv, x, weight, bias, residual, relu=True)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, residual, relu=True), "conv", exact=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's numpy
def test_nan_and_inf_reach_their_pixels_through_the_relu(launches):
    """A NaN pixel of x makes every channel of that output pixel NaN, through the ReLU; an Inf
    makes them +-Inf (the ReLU turning -Inf into 0); other pixels stay finite."""
    conv = Conv(1, 16, 3, 4, 8, 1, 1)
    torch.manual_seed(0)
    x, weight, bias, _ = make_inputs(conv, torch.float16, residual=False)
    x[0, :, 0, 0] = NAN
    x[0, 0, 2, 3] = float("inf")
    out = run_conv2d(conv, x, weight, bias, relu=True)
    reference = reference_conv2d(conv, x, weight, bias, relu=True)
    assert_close_to_reference(out, reference, "conv")
    assert out[0, :, 0, 0].isnan().all()
    assert out[0, :, 2, 3].isinf().any() and ((out[0, :, 2, 3] == 0) | out[0, :, 2, 3].isinf()).all()
    others = torch.ones(3, 4, dtype=torch.bool)
    others[0, 0] = others[2, 3] = False
    assert out[0][:, others].isfinite().all()
    assert len(launches) == 1


@pytest.mark.parametrize("pointwise_faster", [True, False], ids=["tma_faster", "implicit_gemm_faster"])
def test_the_kernel_measured_faster_runs_and_the_choice_is_kept(monkeypatch, launches, pointwise_faster):
    """On a GPU a problem's first call times both kernels, each at its tuned tile (here with a
    stand-in clock: the interpreter cannot time), keeps the faster, and later calls launch it
    without timing again. Both give the reference's result; the benchmark names the kernel that ran."""
    check_measured_choice(monkeypatch, launches, Conv(2, 40, 5, 7, 24, 1, 1), pointwise_faster, "tma-32x32x16-g8-w4-s1")


def check_measured_choice(monkeypatch, launches, conv: Conv, tma_faster: bool, tma_name: str):
    """Two calls of conv (bias, ReLU, no residual: a benchmark's layer) with a stand-in clock that
    makes the TMA kernel (timed first) or the implicit GEMM faster."""
    monkeypatch.setattr(conv2d_module, "kernels_can_be_timed", lambda: True)
    monkeypatch.setattr(conv2d_module, "tma_choices", {})
    timings = []

    def stand_in_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"  # do_bench's default is the mean: one slow run would sway it
        fn()
        timings.append(fn)
        return 1.0 if (len(timings) == 1) == tma_faster else 2.0  # the TMA kernel is timed first

    monkeypatch.setattr(conv2d_module.triton.testing, "do_bench", stand_in_do_bench)
    for seed in range(2):
        check_conv2d(conv, torch.bfloat16, residual=False, relu=True, seed=seed)
    assert len(timings) == 2  # the first call timed both; the second timed nothing
    # Tuning and timing ran the TMA kernel once each; then each call launched it if it won.
    assert len(launches) == 2 + 2 * tma_faster
    x, weight, bias, _ = make_inputs(conv, torch.bfloat16)
    problem = ConvProblem(conv.c, conv.h, conv.w, conv.k, conv.r, conv.s, (1, 1), (conv.padding,) * 2)
    name = bench.kernel_name("triton", problem, x, weight, bias)
    assert name == (tma_name if tma_faster else "32x32x16-g4-w4-s1-split1")


def test_applies_to_the_real_1x1_layers_and_inceptions_slices():
    """Every 1x1 stride-1 layer of the architectures (at the real layers' test size: 2 images, 3x5
    pixels, channels_last) has C and K multiples of 8, so all take the TMA kernel in
    float16/bfloat16; and GoogLeNet's two 1x1 branches that write channel slices of the Inception
    output (the first and the pooling branch) start on a multiple of 8 channels of an output whose
    width is one too, so their slices are on the 16-byte grid."""
    from tests.test_conv2d import REAL_LAYERS, real_layer_problem

    pointwise = [layer for layer in REAL_LAYERS if layer[2] == (1, 1) and layer[3] == (1, 1)]
    assert len(pointwise) > 20
    for c, k, kernel, stride, padding in pointwise:
        x, weight, res, out = layer(real_layer_problem(c, k, kernel, stride, padding), torch.bfloat16)
        assert conv2d_pointwise.applies(x, weight, res, out, stride, padding, (1, 1)), (c, k)
    widths_of_each = inception_branch_widths()
    assert len(widths_of_each) == 9
    for widths in widths_of_each:
        pool_branch_start, total = sum(widths[:3]), sum(widths)
        assert pool_branch_start % 8 == 0 and total % 8 == 0, widths


def inception_branch_widths() -> list[list[int]]:
    """The output channels of the four branches of each of GoogLeNet's Inception blocks."""
    from torchvision.models import googlenet
    from torchvision.models.googlenet import Inception

    return [[inception.branch1.conv.out_channels] + [
        branch[1].conv.out_channels for branch in (inception.branch2, inception.branch3, inception.branch4)]
        for inception in googlenet(init_weights=False, aux_logits=False).modules() if isinstance(inception, Inception)]


def test_a_tma_kernel_that_fails_leaves_the_layer_to_the_implicit_gemm_with_a_warning(monkeypatch):
    """Where the TMA kernel raises when it is first tuned (a compile or launch error on some GPU or
    Triton version), a warning names the layer and the error, and the implicit GEMM runs it, on
    that call and the later ones."""
    check_failure_falls_back(monkeypatch, conv2d_pointwise, Conv(2, 40, 5, 7, 24, 1, 1),
                             r"TMA conv kernel conv2d_pointwise failed on \(2, 40, 5, 7\) -> 24 .*stand-in failure")


def check_failure_falls_back(monkeypatch, module, conv: Conv, message: str):
    """module's launcher raising on conv's first call: a warning matching `message`, the implicit
    GEMM's right result on that call and the next, and no second attempt."""
    monkeypatch.setattr(conv2d_module, "kernels_can_be_timed", lambda: True)
    monkeypatch.setattr(conv2d_module, "tma_choices", {})
    attempts = []

    def failing_launcher(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("stand-in failure")

    monkeypatch.setattr(module, "launch", failing_launcher)
    with pytest.warns(UserWarning, match=message):
        check_conv2d(conv, torch.float16, relu=True)
    check_conv2d(conv, torch.float16, relu=True, seed=1)
    assert len(attempts) == 1
