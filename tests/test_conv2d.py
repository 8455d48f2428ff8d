"""conv2d: the Triton kernel (under the interpreter on a CPU) and the torch backend against a
float64 reference, on every real conv layer and on odd shapes; layouts, out=, NaN, integer
values, every autotune config, torch.compile, FLOP counting, and the bad-input contract."""
import itertools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnfast import backends, ops
from cnnfast.analysis import analyze_arch, conv_problems
from cnnfast.models import ARCHITECTURES
from cnnfast.precision import tf32_allowed
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels import conv2d as conv2d_module
from cnnfast.triton_kernels.conv2d import (
    config_name, conv2d_bias_act, conv2d_configs, split_k_configs, use_flat_reduction,
)
from tests.test_global_avg_pool import forbid_triton, unwritten_reads_nan

# The Triton backend runs CPU tensors only under the interpreter (conftest sets it when there is no GPU).
pytestmark = pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton kernel on CPU tensors")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The conv backends that run CPU tensors (triton and torch_triton under the interpreter).
HOST_BACKENDS = ["triton", "torch", "torch_triton"]
CHANNELS_LAST = torch.channels_last
NAN = float("nan")


class Conv(NamedTuple):
    """One convolution problem: input (n, c, h, w), weight (k, c, r, s)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1

    def output_shape(self):
        p, q = ops.conv2d_output_size("test", (self.n, self.c, self.h, self.w), (self.k, self.c, self.r, self.s),
                                      pair(self.stride), pair(self.padding), pair(self.dilation))
        return (self.n, self.k, p, q)


def conv_id(conv: Conv) -> str:
    return (f"{conv.n}x{conv.c}x{conv.h}x{conv.w}-k{conv.k}-{conv.r}x{conv.s}"
            f"-s{conv.stride}-p{conv.padding}-d{conv.dilation}").replace(" ", "")


def pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def input_extent(output: int, kernel: int, stride: int, padding: int) -> int:
    """The input size that gives `output` positions (dilation 1)."""
    return (output - 1) * stride + kernel - 2 * padding


def real_conv_layers():
    """Every distinct (C, K, kernel, stride, padding) among the conv layers of all architectures."""
    layers = set()
    for arch in ARCHITECTURES:
        for layer in analyze_arch(arch).layers:
            if layer.type == "conv":
                layers.add((layer.input_shape[0], layer.output_shape[0], tuple(layer.kernel_size),
                            tuple(layer.stride), tuple(layer.padding)))
    return sorted(layers)


def real_layer_problem(c, k, kernel, stride, padding) -> Conv:
    """A real layer's C, K, kernel, stride and padding on a 2-image batch with 3x5 outputs."""
    (r, s), out_h, out_w = kernel, 3, 5
    h, w = input_extent(out_h, r, stride[0], padding[0]), input_extent(out_w, s, stride[1], padding[1])
    return Conv(2, c, h, w, k, r, s, stride, padding)


def make_inputs(conv: Conv, dtype, *, bias_dtype=torch.float32, residual=True):
    """Random x, weight, bias, residual in channels_last; the weight is scaled by 1/sqrt(C*R*S)
    (as trained layers are) so outputs are O(1) and the tolerances are meaningful."""
    x = torch.randn(conv.n, conv.c, conv.h, conv.w).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    weight = torch.randn(conv.k, conv.c, conv.r, conv.s) / math.sqrt(conv.c * conv.r * conv.s)
    weight = weight.to(dtype).contiguous(memory_format=CHANNELS_LAST)
    bias = None if bias_dtype is None else (0.5 * torch.randn(conv.k)).to(bias_dtype)
    res = torch.randn(conv.output_shape()).to(dtype).contiguous(memory_format=CHANNELS_LAST) if residual else None
    return x, weight, bias, res


def nan_output(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype).contiguous(memory_format=CHANNELS_LAST)


def reference_conv2d(conv: Conv, x, weight, bias=None, residual=None, relu=False, groups=1):
    """relu?(conv2d + bias + residual) in float64."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                 conv.stride, conv.padding, conv.dilation, groups)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def run_conv2d(conv: Conv, x, weight, bias=None, residual=None, relu=False, backend="triton", out=None):
    return ops.conv2d(x, weight, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      residual=residual, relu=relu, out=out, backend=backend)


def check_conv2d(conv: Conv, dtype, *, bias_dtype=torch.float32, residual=True, relu=False, backend="triton",
                 into_out=False, seed=0):
    """One call of the public op against the reference; into_out: into a NaN-filled out=."""
    torch.manual_seed(seed)
    x, weight, bias, res = make_inputs(conv, dtype, bias_dtype=bias_dtype, residual=residual)
    target = nan_output(conv.output_shape(), dtype) if into_out else None
    with unwritten_reads_nan(x.device):
        out = run_conv2d(conv, x, weight, bias, res, relu, backend, out=target)
    assert out.dtype == dtype and out.shape == conv.output_shape()
    assert out.is_contiguous(memory_format=CHANNELS_LAST)
    assert target is None or out is target
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu), "conv")


# ---------------------------------------------------------------- every real layer


# The real layers run through the launcher with each of the Hopper autotune configs in turn (a
# different one per dtype): the interpreter costs ~2 ms per tile step, so the Hopper tiles (16x to
# 64x the area of the interpreter's default 32x32x16 tile) make all 80 layers affordable, while the
# public op's path is covered by the odd shapes below. A layer runs in all three dtypes, except the
# few with a million weights or more (the deep 3x3 and 1x1 layers, 5 to 30 s per dtype here, half
# of these tests' time), which run in one, in turn. Outputs are NaN-filled first; every layer gets
# a float32 bias (a folded BatchNorm) and ReLU, every other one a residual.
REAL_LAYERS = real_conv_layers()
LARGE_LAYER_WEIGHTS = 1 << 20


def layer_id(layer):
    c, k, (r, s), stride, padding = layer
    return f"{c}-{k}-{r}x{s}-s{stride[0]}-p{padding[0]}"


def real_layer_dtypes(index):
    c, k, (r, s), _, _ = REAL_LAYERS[index]
    return DTYPES if c * k * r * s < LARGE_LAYER_WEIGHTS else (DTYPES[index % len(DTYPES)],)


@pytest.mark.parametrize("index, dtype", [
    pytest.param(index, dtype, id=f"{layer_id(layer)}-{dtype}")
    for index, layer in enumerate(REAL_LAYERS) for dtype in real_layer_dtypes(index)
])
def test_real_layer(index, dtype):
    conv = real_layer_problem(*REAL_LAYERS[index])
    configs = conv2d_configs(flat=use_flat_reduction(REAL_LAYERS[index][0]), interpreted=False)
    config = configs[(index + DTYPES.index(dtype)) % len(configs)]
    torch.manual_seed(index)
    residual = index % 2 == 1
    x, weight, bias, res = make_inputs(conv, dtype, residual=residual)
    out = nan_output(conv.output_shape(), dtype)
    conv2d_bias_act(x, weight, bias, res, out, conv.stride, conv.padding, (1, 1), True, config=config)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def test_real_layer_list_spans_the_architectures():
    kernels = {layer[2] for layer in REAL_LAYERS}
    assert len(REAL_LAYERS) >= 60 and {(11, 11), (7, 7), (5, 5), (3, 3), (1, 1)} <= kernels
    assert any(layer[0] == 3 for layer in REAL_LAYERS) and any(layer[0] >= 1024 for layer in REAL_LAYERS)


# ---------------------------------------------------------------- odd shapes, through the public op


STEM = Conv(2, 3, 9, 11, 16, 7, 7, stride=2, padding=3)
FLAT = Conv(2, 5, 7, 7, 7, 5, 5, padding=2)
CHANNEL_BLOCKED = Conv(2, 96, 6, 5, 40, 3, 3, stride=2)
ANISOTROPIC = Conv(1, 6, 6, 9, 5, 3, 5, stride=(2, 1), padding=(0, 2), dilation=(1, 2))
ODD_SHAPES = [
    STEM,  # C=3 stem, 7x7 stride 2, H != W
    Conv(1, 3, 15, 19, 8, 11, 11, stride=4, padding=2),  # 11x11 stride 4
    FLAT,  # 5x5, primes
    Conv(1, 13, 11, 7, 17, 3, 3, padding=1),  # C and K primes, not tile multiples
    Conv(3, 40, 5, 6, 33, 3, 3, stride=2, padding=1),  # C=40: the flat order, stride 2
    Conv(2, 80, 4, 3, 19, 1, 1),  # C=80: channel-blocked, 1x1
    Conv(1, 67, 5, 4, 21, 3, 3, padding=1),  # C=67: channel-blocked with a partial last block
    CHANNEL_BLOCKED,  # stride 2, padding 0
    Conv(1, 64, 1, 1, 24, 1, 1),  # 1x1 spatial
    Conv(2, 32, 1, 1, 16, 3, 3, padding=1),  # 1x1 spatial, only the centre tap inside
    Conv(1, 17, 3, 3, 4, 3, 3),  # a single output pixel
    Conv(2, 16, 9, 8, 8, 3, 3, padding=2, dilation=2),  # dilation 2
    ANISOTROPIC,  # different along H and W
    Conv(1, 7, 5, 4, 9, 2, 2, padding=3),  # padding 3 > kernel - 1: whole rows of zeros
    Conv(1, 11, 3, 5, 6, 1, 1, stride=2, padding=1),  # 1x1 with padding: border outputs are the bias
    Conv(0, 8, 5, 5, 8, 3, 3, padding=1),  # batch 0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", ODD_SHAPES, ids=conv_id)
def test_odd_shape(conv, dtype):
    check_conv2d(conv, dtype)


EPILOGUES = {  # bias dtype ("input" = the input's), residual, relu
    "plain": (None, False, False),
    "bias": ("input", False, False),
    "bias32": (torch.float32, False, False),
    "relu": (None, False, True),
    "residual": (None, True, False),
    "bias-relu": ("input", False, True),
    "bias32-relu": (torch.float32, False, True),
    "bias-residual-relu": ("input", True, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("conv", [FLAT, CHANNEL_BLOCKED], ids=["flat", "channel-blocked"])
def test_epilogue(conv, epilogue, dtype):
    bias_dtype, residual, relu = EPILOGUES[epilogue]
    check_conv2d(conv, dtype, bias_dtype=dtype if bias_dtype == "input" else bias_dtype, residual=residual, relu=relu)


@pytest.mark.parametrize("conv", [STEM, ANISOTROPIC], ids=["stem", "anisotropic"])
@pytest.mark.parametrize("relu", [False, True])
def test_torch_backend_matches_reference(conv, relu):
    check_conv2d(conv, torch.float32, relu=relu, backend="torch")


POINTWISE = Conv(2, 40, 5, 7, 24, 1, 1)  # a bottleneck's 1x1 layer in miniature, H != W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_torch_backend_runs_pointwise_convs_as_one_matrix_product(monkeypatch, epilogue, dtype):
    """A 1x1 stride-1 conv on channels_last input is one GEMM on the torch backend (addmm with the
    bias or the residual, or mm; on a CPU float32 too, on a GPU float16/bfloat16 only); then bias
    and ReLU as needed. Each epilogue and dtype against the float64 reference; NCHW input takes the
    convolution path."""
    products = []
    for name in ("mm", "addmm"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, original=original: products.append(args) or original(*args))
    bias_dtype, residual, relu = EPILOGUES[epilogue]
    check_conv2d(POINTWISE, dtype, bias_dtype=dtype if bias_dtype == "input" else bias_dtype, residual=residual,
                 relu=relu, backend="torch")
    assert len(products) == 1
    products.clear()
    x, weight, bias, res = make_inputs(POINTWISE, dtype, residual=residual)
    x, res = x.contiguous(), None if res is None else res.contiguous()
    out = ops.conv2d(x, weight, bias, residual=res, relu=relu, backend="torch")
    assert_close_to_reference(out, reference_conv2d(POINTWISE, x, weight, bias, res, relu), "conv")
    assert not products


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", [POINTWISE, CHANNEL_BLOCKED], ids=["pointwise", "3x3"])
def test_torch_backend_propagates_nan_through_bias_and_relu(conv, dtype):
    """NaN in one input pixel reaches the outputs it touches as NaN, through the bias add and the
    ReLU, on both torch paths (the GEMM and the convolution), as torch.relu does."""
    torch.manual_seed(0)
    x, weight, bias, _ = make_inputs(conv, dtype, residual=False)
    x[0, :, 0, 0] = NAN
    out = ops.conv2d(x, weight, bias, stride=conv.stride, padding=conv.padding, relu=True, backend="torch")
    expected = reference_conv2d(conv, x, weight, bias, None, relu=True)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()


def test_default_backend_on_cpu_is_torch(monkeypatch):
    forbid_triton(monkeypatch)
    conv = Conv(1, 4, 5, 5, 3, 3, 3, padding=1)
    x, weight, bias, _ = make_inputs(conv, torch.float32)
    assert_close_to_reference(ops.conv2d(x, weight, bias, padding=1), reference_conv2d(conv, x, weight, bias), "conv")


# ---------------------------------------------------------------- every autotune config


def config_problem(config, channels) -> Conv:
    """A 3x3 conv with padding 1, two column tiles (the second partial) and a partial last row
    tile. The flat order gets more row tiles than GROUP_M, so the grouped tile order wraps; the
    channel-blocked order, whose steps cost more under the interpreter, two images of one row."""
    block_m, block_n, group_m = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["GROUP_M"]
    if use_flat_reduction(channels):
        return Conv(1, channels, group_m + 1, block_m + 3, block_n + 5, 3, 3, padding=1)
    return Conv(2, channels, 1, block_m - 7, block_n + 5, 3, 3, padding=1)


# (name, channels, config): each Hopper config on the channel counts of its reduction order (72
# channels leave the last block partial for every BLOCK_K), each interpreter config on all three.
CONFIG_CASES = (
    [(f"hopper-blocked{i}", channels, config)
     for i, config in enumerate(conv2d_configs(flat=False, interpreted=False) + split_k_configs(False, False))
     for channels in (64, 72)]
    + [(f"hopper-flat{i}", 5, config)
       for i, config in enumerate(conv2d_configs(flat=True, interpreted=False) + split_k_configs(True, False))]
    + [(f"interpreter{i}", channels, config)
       for i, config in enumerate(conv2d_configs(flat=False, interpreted=True) + split_k_configs(False, True))
       for channels in (5, 64, 72)]
)


@pytest.mark.parametrize("index", range(len(CONFIG_CASES)),
                         ids=[f"{name}-c{channels}-{config_name(config)}" for name, channels, config in CONFIG_CASES])
def test_autotune_config(index):
    """Each config of every set, called directly (the tuner would pick only one), in one of the
    three dtypes in turn."""
    _, channels, config = CONFIG_CASES[index]
    dtype = DTYPES[index % len(DTYPES)]
    conv = config_problem(config, channels)
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    out = nan_output(conv.output_shape(), dtype)
    conv2d_bias_act(x, weight, bias, res, out, (1, 1), (1, 1), (1, 1), True, config=config)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


# ---------------------------------------------------------------- split-K


def recording_workspace(monkeypatch):
    """Records every split-K workspace the launcher allocates."""
    made = []

    def record(*args):
        workspace = original(*args)
        made.append(workspace)
        return workspace

    original = conv2d_module.split_k_workspace
    monkeypatch.setattr(conv2d_module, "split_k_workspace", record)
    return made


@pytest.mark.parametrize("flat", [False, True], ids=["channel_blocked", "flat"])
def test_split_k_is_deterministic_and_leaves_the_counters_at_zero(monkeypatch, flat):
    """Three splits of step counts they do not divide (2x2 taps x 2 channel blocks = 8 steps, split
    2 + 3 + 3; 2x2x5 = 20 flat indices in 2 blocks of 16, split 0 + 1 + 1, so one split reduces
    nothing): the partials summed in split order give the same bits on every run, and each tile's
    last arrival resets its counter (a launch that left one set would make the next launch's
    tiles finish early)."""
    made = recording_workspace(monkeypatch)
    conv = Conv(1, 5 if flat else 32, 7, 6, 40, 2, 2, padding=1)
    config = split_k_configs(flat, interpreted=True)[1]
    x, weight, bias, res = make_inputs(conv, torch.float32)
    outputs = []
    for _ in range(2):
        out = nan_output(conv.output_shape(), torch.float32)
        conv2d_bias_act(x, weight, bias, res, out, (1, 1), (1, 1), (1, 1), True, config=config)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    assert_close_to_reference(outputs[0], reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")
    (partials, arrivals), _ = made
    assert partials.shape == (3, 56, 40) and arrivals.shape == (4,)  # 8 x 7 pixels, 2 x 2 tiles of 32 x 32
    assert torch.count_nonzero(arrivals) == 0


def test_split_k_with_more_splits_than_steps():
    """A 1x1 conv on 16 channels has one reduction step: splits past it add zero partials."""
    conv = Conv(1, 16, 1, 1, 24, 1, 1)
    config = split_k_configs(False, interpreted=True)[1]
    x, weight, bias, res = make_inputs(conv, torch.float32)
    out = nan_output(conv.output_shape(), torch.float32)
    conv2d_bias_act(x, weight, bias, res, out, (1, 1), (0, 0), (1, 1), True, config=config)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def test_split_k_is_offered_only_when_tiles_are_fewer_than_sms(monkeypatch):
    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    cuda = torch.device("cuda", 0)
    assert conv2d_module.split_k_helps(49, 512, cuda)  # batch 1, 7x7: 1 x 8 tiles
    assert not conv2d_module.split_k_helps(256 * 49, 512, cuda)  # batch 256: 196 x 8 tiles
    assert not conv2d_module.split_k_helps(49, 512, torch.device("cpu"))  # the interpreter times nothing
    assert conv2d_module.split_k_workspace(conv2d_configs(False, interpreted=False), 49, 512, cuda) is None


@pytest.mark.parametrize("flat", [False, True], ids=["channel_blocked", "flat"])
def test_ieee_float32_layers_are_tuned_without_the_tiles_that_spill(monkeypatch, flat):
    """The tuner's pruning reads the operands' dtype and the dot precision the launcher passes
    (dot_precision, here as on a GPU): IEEE float32 leaves out the spilling tiles
    (tests/test_triton_compile.py compiles the rest without spills); TF32, float16 and bfloat16,
    whose precision also reads "ieee", keep all."""
    monkeypatch.setattr(conv2d_module, "config_fits", lambda config, dtype, device: True)
    monkeypatch.setattr(conv2d_module, "INTERPRETED", False)
    configs = conv2d_configs(flat, interpreted=False) + split_k_configs(flat, interpreted=False)
    every = [config_name(config) for config in configs]

    def kept(dtype, tf32):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        x = torch.empty(0, dtype=dtype)
        pruned = conv2d_module.prune_configs(configs, {"x_ptr": x}, INPUT_PRECISION=conv2d_module.dot_precision(x))
        return [config_name(config) for config in pruned]

    assert kept(torch.float32, tf32=True) == every
    assert kept(torch.float16, tf32=False) == every and kept(torch.bfloat16, tf32=False) == every
    spilling = [config_name(config) for config in configs
                if conv2d_module.tile_of(config) in conv2d_module.IEEE_SPILLING_TILES]
    ieee = kept(torch.float32, tf32=False)
    assert spilling and ieee == [name for name in every if name not in spilling]
    assert any(name.endswith("split1") for name in ieee)  # a whole-reduction tile is always left


def test_split_k_workspace_fits_every_candidate():
    configs = conv2d_configs(False, interpreted=False) + split_k_configs(False, interpreted=False)
    partials, arrivals = conv2d_module.split_k_workspace(configs, 49, 100, torch.device("cpu"))
    # The most splits (8) of the whole (M, K) output, and a counter for each tile of the smallest
    # split tile (64 x 32: 1 x 4 tiles).
    assert partials.shape == (8, 49, 100) and partials.dtype == torch.float32
    assert arrivals.shape == (4,) and torch.count_nonzero(arrivals) == 0


@pytest.mark.parametrize("chosen_split", [False, True], ids=["tuner_keeps_one_split", "tuner_splits"])
def test_tuned_choice_is_launched_directly(monkeypatch, chosen_split):
    """The first call of a problem goes through the tuner, with a workspace for every candidate;
    later calls launch the config it chose without the tuner, and allocate a workspace only when
    that config splits K. Both give the reference result."""
    split, whole = split_k_configs(False, interpreted=True)[0], conv2d_configs(False, interpreted=True)[0]
    chosen = split if chosen_split else whole
    # Pruning to the chosen config makes the tuner pick it without timing (the interpreter cannot time).
    tuner = triton.autotune(configs=[whole, split], key=["N", "C", "K"],
                            prune_configs_by={"early_config_prune": lambda configs, named_args, **kwargs: [chosen]})(
        conv2d_module.conv2d_bias_act_heuristic)
    # Triton 3.8 launches a single config left by pruning untimed; 3.6 times it, which the
    # interpreter cannot: a stand-in clock runs it once (assigned: reading the attribute asks for a driver).
    tuner.do_bench = lambda kernel_call, quantiles: kernel_call() or [1.0, 1.0, 1.0]
    tuner_runs = []
    tuned_run = tuner.run
    monkeypatch.setattr(tuner, "run", lambda *args, **kwargs: tuner_runs.append(1) or tuned_run(*args, **kwargs))
    monkeypatch.setattr(conv2d_module, "conv2d_bias_act_autotuned", {(torch.device("cpu"), False, False): tuner})
    monkeypatch.setattr(conv2d_module, "chosen_configs", {})
    made = recording_workspace(monkeypatch)

    conv = Conv(2, 32, 6, 5, 40, 3, 3, padding=1)
    x, weight, bias, res = make_inputs(conv, torch.float32)
    reference = reference_conv2d(conv, x, weight, bias, res, relu=True)
    for _ in range(3):
        out = nan_output(conv.output_shape(), torch.float32)
        conv2d_bias_act(x, weight, bias, res, out, [1, 1], [1, 1], [1, 1], True)
        assert_close_to_reference(out, reference, "conv")
    assert len(tuner_runs) == 1
    assert list(conv2d_module.chosen_configs.values()) == [chosen]
    assert made[0] is not None  # the tuner may pick the split candidate
    assert all((workspace is not None) == chosen_split for workspace in made[1:])


# ---------------------------------------------------------------- layouts and out=


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values (for "expanded": its first item broadcast) in another memory layout; the memory
    around a view is NaN, so a read outside the view shows up."""
    n, c, h, w = t.shape
    if layout == "channels_last":
        return t.contiguous(memory_format=CHANNELS_LAST)
    if layout == "nchw":
        return t.contiguous()
    if layout == "channel_slice":  # channels_last storage, channels 1..c of c + 3
        big = torch.full((n, c + 3, h, w), NAN, dtype=t.dtype, device=t.device).contiguous(memory_format=CHANNELS_LAST)
        big[:, 1 : c + 1] = t
        return big[:, 1 : c + 1]
    if layout == "spatial_stride":  # every other pixel of an NCHW tensor
        big = torch.full((n, c, 2 * h, 2 * w), NAN, dtype=t.dtype, device=t.device)
        big[:, :, ::2, ::2] = t
        return big[:, :, ::2, ::2]
    if layout == "storage_offset":  # channels_last at an odd offset into its storage
        flat = torch.full((t.numel() + 5,), NAN, dtype=t.dtype, device=t.device)
        view = flat[5:].view(n, h, w, c).permute(0, 3, 1, 2)
        view.copy_(t)
        return view
    if layout == "expanded":  # the first item broadcast along dim 0 (stride 0)
        return t[:1].expand(n, c, h, w)
    raise ValueError(layout)


LAYOUTS = ("channels_last", "nchw", "channel_slice", "spatial_stride", "storage_offset", "expanded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv", [Conv(2, 5, 6, 7, 9, 3, 3, padding=1), Conv(3, 32, 4, 5, 12, 3, 3, stride=2, padding=1)],
                         ids=["flat", "channel-blocked"])
def test_layouts_give_the_same_result(conv, layout, dtype):
    """x, weight and residual in `layout`, the bias strided: the result equals, bit for bit, that of
    channels_last copies of the same values, and the reference."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x, weight, res = in_layout(x, layout), in_layout(weight, layout), in_layout(res, layout)
    strided_bias = torch.full((2 * conv.k,), NAN)[::2]
    strided_bias.copy_(bias)
    out = run_conv2d(conv, x, weight, strided_bias, res, relu=True)
    dense = [t.contiguous(memory_format=CHANNELS_LAST) for t in (x, weight, res)]
    expected = run_conv2d(conv, dense[0], dense[1], bias, dense[2], relu=True)
    assert torch.equal(out, expected)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def test_wide_offsets_are_taken_where_a_32_bit_term_would_wrap():
    """wide_offsets, on meta tensors of any size: a channel or filter-tap term of x, the weight, the
    residual or out that reaches 2^31 elements (a huge image; a view of a (C, N, H, W) buffer)."""
    def tensor(shape, strides=None):
        return torch.empty_strided(shape, strides or torch.empty(shape, device="meta").stride(), device="meta")

    x, weight, out = tensor((8, 64, 56, 56)), tensor((64, 64, 3, 3)), tensor((8, 64, 56, 56))
    assert not conv2d_module.wide_offsets(x, weight, out, out, (1, 1))
    huge = tensor((1, 64, 8192, 8192)).contiguous(memory_format=CHANNELS_LAST)  # 2^32 elements, one image
    assert not conv2d_module.wide_offsets(huge, weight, None, out, (1, 1))  # its channel and tap terms: small
    assert conv2d_module.wide_offsets(tensor((1, 64, 8192, 8192)), weight, None, out, (1, 1))  # NCHW: c * 2^26
    assert conv2d_module.wide_offsets(huge, weight, None, out, (4096, 1))  # a dilated tap 2 * 4096 rows down
    # (C, N, H, W) buffers seen as (N, C, H, W): the channel stride is the whole batch.
    transposed = tensor((128, 512, 256, 256)).transpose(0, 1)  # 127 * 2^25 past 2^31
    assert conv2d_module.wide_offsets(transposed, tensor((64, 128, 3, 3)), None, out, (1, 1))
    assert not conv2d_module.wide_offsets(transposed[:, :64], weight, None, out, (1, 1))  # 63 * 2^25: fits
    wide_out = tensor((64, 8, 56, 56)).transpose(0, 1)[:, :, :, :]
    assert not conv2d_module.wide_offsets(x, weight, None, wide_out, (1, 1))  # 63 * 8 * 56 * 56: fits
    assert conv2d_module.wide_offsets(x, weight, None, tensor((64, 8, 4096, 4096)).transpose(0, 1), (1, 1))  # 63 * 2^27
    assert conv2d_module.wide_offsets(x, weight, tensor((64, 8, 4096, 4096)).transpose(0, 1), out, (1, 1))
    many = tensor((1, 2**16 + 1, 56, 56)).contiguous(memory_format=CHANNELS_LAST)  # its channel term: 2^16
    assert conv2d_module.wide_offsets(x, tensor((2**16 + 1, 2**15, 1, 1)), None, many, (1, 1))  # k * sw_k = 2^31
    assert not conv2d_module.wide_offsets(x, tensor((2**16, 2**15, 1, 1)), None, many[:, 1:], (1, 1))


def test_an_image_of_2_to_the_31_output_pixels_is_refused():
    """The kernels' pixel coordinates within one image are 32-bit: such a map gets a clear error
    (meta tensors: nothing is allocated or launched)."""
    x, weight = torch.empty(1, 1, 46341, 46341, device="meta"), torch.empty(1, 1, 1, 1, device="meta")
    out = torch.empty(1, 1, 46341, 46341, device="meta")
    with pytest.raises(NotImplementedError, match="46341 x 46341 map has 2\\^31 or more"):
        conv2d_bias_act(x, weight, None, None, out, (1, 1), (0, 0), (1, 1), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", [Conv(2, 5, 6, 7, 9, 3, 3, padding=1, dilation=2),
                                  Conv(3, 32, 4, 5, 12, 3, 3, stride=2, padding=1)], ids=["flat", "channel-blocked"])
def test_wide_offsets_give_the_same_result(monkeypatch, conv, dtype):
    """The kernel with every stride product in int64 (forced here: a 2^31-element case needs 8 GB):
    NCHW operands, whose channel strides are not 1, into a NaN-filled channel slice."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x, weight, res = (t.contiguous() for t in (x, weight, res))
    expected = run_conv2d(conv, x, weight, bias, res, relu=True)
    monkeypatch.setattr(conv2d_module, "wide_offsets", lambda *args: True)
    big = torch.full((conv.n, conv.k + 3, *conv.output_shape()[2:]), NAN, dtype=dtype)
    out = run_conv2d(conv, x, weight, bias, res, relu=True, out=big[:, 2:2 + conv.k])
    assert torch.equal(out, expected) and big[:, :2].isnan().all() and big[:, -1].isnan().all()
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_into_channel_slice(dtype, backend):
    """out= a channel slice of a larger NaN-filled channels_last tensor: the slice is written in
    full, the channels around it stay NaN."""
    conv = Conv(2, 24, 5, 6, 10, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    n, k, p, q = conv.output_shape()
    big = nan_output((n, k + 7, p, q), dtype)
    out = big[:, 3 : 3 + k]
    assert run_conv2d(conv, x, weight, bias, res, relu=True, backend=backend, out=out) is out
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")
    assert big[:, :3].isnan().all() and big[:, 3 + k :].isnan().all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("out_layout", ["nchw", "spatial_stride"])
def test_out_with_other_strides(out_layout, backend):
    conv = Conv(1, 6, 7, 5, 11, 3, 3, stride=2, padding=1)
    torch.manual_seed(0)
    x, weight, bias, _ = make_inputs(conv, torch.float32, residual=False)
    out = in_layout(torch.full(conv.output_shape(), NAN), out_layout)
    run_conv2d(conv, x, weight, bias, backend=backend, out=out)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias), "conv")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_batch_zero_with_out(backend):
    conv = Conv(0, 8, 4, 4, 5, 3, 3, padding=1)
    x, weight, bias, res = make_inputs(conv, torch.float32)
    out = nan_output(conv.output_shape(), torch.float32)
    assert run_conv2d(conv, x, weight, bias, res, backend=backend, out=out).shape == (0, 5, 4, 4)


# ---------------------------------------------------------------- special values


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", [Conv(2, 3, 9, 8, 6, 3, 3, stride=2, padding=1, dilation=2),
                                  Conv(1, 48, 7, 6, 5, 3, 3, padding=1)], ids=["flat", "channel-blocked"])
def test_nan_and_inf_propagate_like_torch(conv, dtype):
    """NaN and Inf in x reach exactly the outputs whose receptive field holds them, through the
    ReLU (NaN stays NaN, -Inf becomes 0). With stride 2, padding 1 and dilation 2 only odd rows
    and columns are ever read, so the NaN at (0, 0) must reach no output there."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x[0, 1, 0, 0] = NAN
    x[-1, 2, 3, 5] = NAN
    x[0, 0, 5, 1] = float("inf")
    x[-1, 0, 1, 3] = float("-inf")
    out = run_conv2d(conv, x, weight, bias, res, relu=True)
    expected = reference_conv2d(conv, x, weight, bias, res, relu=True)
    assert expected.isnan().any() and expected.isinf().any() and not expected.isnan().all()
    assert_close_to_reference(out, expected, "conv")


INTEGER_SHAPES = [  # C*R*S <= 252: every sum of products of values in [-1, 1], plus a bias and a
    # residual in [-2, 2], is an integer below 256, exact in bfloat16 as well
    Conv(2, 3, 9, 10, 8, 7, 7, stride=2, padding=3),
    Conv(1, 5, 8, 7, 6, 5, 5, padding=2, dilation=2),
    Conv(2, 16, 5, 6, 20, 3, 3, padding=1),
    Conv(1, 80, 4, 5, 36, 1, 1),
    Conv(1, 7, 4, 1, 3, 3, 1, padding=(1, 0)),
]


@pytest.mark.parametrize("backend", ["triton", "torch_triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", INTEGER_SHAPES, ids=conv_id)
def test_integer_values_exact(conv, dtype, backend):
    torch.manual_seed(0)
    x = torch.randint(-1, 2, (conv.n, conv.c, conv.h, conv.w)).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    weight = torch.randint(-1, 2, (conv.k, conv.c, conv.r, conv.s)).to(dtype)
    bias = torch.randint(-2, 3, (conv.k,)).float()
    res = torch.randint(-2, 3, conv.output_shape()).to(dtype)
    with unwritten_reads_nan(x.device):
        out = run_conv2d(conv, x, weight, bias, res, relu=True, backend=backend)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv", exact=True)


@pytest.mark.parametrize("backend", ["triton", "torch_triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", [Conv(1, 3, 5, 4, 8, 3, 3, padding=1), Conv(1, 16, 4, 5, 8, 3, 3, padding=1),
                                  Conv(1, 16, 4, 5, 8, 1, 1)], ids=conv_id)
def test_the_epilogue_rounds_once_after_bias_and_residual(conv, dtype, backend):
    """A residual of 2048 and a float32 bias of -2048: conv + residual falls between the numbers
    float16 (steps of 2 there) and bfloat16 (steps of 16) hold, conv + residual + bias is a small
    integer. Summed in float32 and rounded once, the result is exact; an epilogue that rounds before
    adding the bias is off by a unit or more (the small-integer test above cannot see that)."""
    torch.manual_seed(0)
    x = torch.randint(-1, 2, (conv.n, conv.c, conv.h, conv.w)).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    weight = torch.randint(-1, 2, (conv.k, conv.c, conv.r, conv.s)).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    res = torch.full(conv.output_shape(), 2048.0, dtype=dtype).contiguous(memory_format=CHANNELS_LAST)
    bias = torch.full((conv.k,), -2048.0)
    expected = reference_conv2d(conv, x, weight, bias, res)
    assert (expected.remainder(2) != 0).any()  # odd values, which 2048 + value cannot be in float16
    assert_close_to_reference(run_conv2d(conv, x, weight, bias, res, backend=backend), expected, "conv", exact=True)


# ---------------------------------------------------------------- the Triton backend really runs


def test_triton_backend_does_not_call_torch_conv(monkeypatch):
    conv = Conv(1, 4, 5, 6, 3, 3, 3, padding=1)
    x, weight, bias, res = make_inputs(conv, torch.float32)
    expected = reference_conv2d(conv, x, weight, bias, res)

    def forbidden(*args, **kwargs):
        raise AssertionError("PyTorch's convolution was called")

    for module, name in [(F, "conv2d"), (torch, "conv2d"), (torch, "convolution")]:
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(AssertionError, match="PyTorch's convolution was called"):  # the trap works
        run_conv2d(conv, x, weight, bias, res, backend="torch")
    assert_close_to_reference(run_conv2d(conv, x, weight, bias, res, backend="triton"), expected, "conv")


# ---------------------------------------------------------------- torch.compile and FLOP counting


class TinyConvNet(nn.Module):
    """conv + bias + ReLU, then conv + residual, through cnnfast ops."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.register_buffer("weight1", torch.randn(6, 4, 3, 3) / 6)
        self.register_buffer("bias1", torch.randn(6))
        self.register_buffer("weight2", torch.randn(6, 6, 1, 1) / 3)

    def forward(self, x):
        y = ops.conv2d(x, self.weight1, self.bias1, padding=1, relu=True, backend=self.backend)
        return ops.conv2d(y, self.weight2, residual=y, backend=self.backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = TinyConvNet(backend)
    x = torch.randn(2, 4, 5, 7)
    compiled = torch.compile(model, fullgraph=True)
    first = Conv(2, 4, 5, 7, 6, 3, 3, padding=1)
    y = reference_conv2d(first, x, model.weight1, model.bias1, relu=True)
    expected = reference_conv2d(Conv(2, 6, 5, 7, 6, 1, 1), y, model.weight2, residual=y)
    assert_close_to_reference(compiled(x), expected, "conv")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("with_out", [False, True], ids=["functional", "out"])
def test_flop_counter_counts_the_op(with_out, backend):
    conv = Conv(2, 6, 9, 7, 5, 3, 3, stride=2, padding=1)
    x, weight, bias, res = make_inputs(conv, torch.float32)
    n, k, p, q = conv.output_shape()
    out = nan_output(conv.output_shape(), torch.float32) if with_out else None
    with FlopCounterMode(display=False) as counter:
        run_conv2d(conv, x, weight, bias, res, relu=True, backend=backend, out=out)
    assert counter.get_total_flops() == 2 * n * k * p * q * conv.c * conv.r * conv.s


# ---------------------------------------------------------------- the bad-input contract


def valid_args():
    """Arguments that work: x (1, 4, 5, 5), weight (6, 4, 3, 3), padding 1 -> out (1, 6, 5, 5)."""
    return dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6), padding=1)


BAD_INPUTS = {  # name: (replaced arguments, error, message pattern)
    "input-rank": (dict(x=torch.randn(4, 5, 5)), ValueError, r"4-D \(N, C, H, W\) input, got 3-D"),
    "weight-rank": (dict(weight=torch.randn(6, 4, 3)), ValueError, r"4-D \(K, C, R, S\) weight, got 3-D"),
    "channels": (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "input has 4 channels"),
    "kernel-too-large": (dict(x=torch.randn(1, 4, 2, 2), padding=0), ValueError, "larger than the padded input"),
    "dilated-too-large": (dict(dilation=4), ValueError, r"dilated extent 9x9\) is larger than the padded input 7x7"),
    "int-input": (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x has dtype torch.int32"),
    "bool-weight": (dict(weight=torch.ones(6, 4, 3, 3, dtype=torch.bool)), TypeError, "weight has dtype torch.bool"),
    "complex-input": (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.complex64)), TypeError, "dtype torch.complex64"),
    "float64-input": (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.float64)), TypeError, "dtype torch.float64"),
    "not-a-tensor": (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    "dtypes-differ": (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float16)), TypeError,
                      "input dtype torch.float32 and weight dtype torch.float16 differ"),
    "devices-differ": (dict(weight=torch.randn(6, 4, 3, 3, device="meta")), RuntimeError,
                       "one device, got x on cpu, weight on meta"),
    "bias-length": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\), got \(5,\)"),
    "bias-too-long": (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(6,\), got \(7,\)"),
    "bias-rank": (dict(bias=torch.randn(6, 1)), ValueError, r"bias must have shape \(6,\)"),
    "bias-dtype": (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias dtype torch.float16"),
    "residual-shape": (dict(residual=torch.randn(1, 6, 4, 5)), ValueError,
                       r"residual must have the output's shape \(1, 6, 5, 5\), got \(1, 6, 4, 5\)"),
    "residual-dtype": (dict(residual=torch.randn(1, 6, 5, 5, dtype=torch.bfloat16)), TypeError,
                       "residual dtype torch.bfloat16 differs"),
    "out-shape": (dict(out=torch.empty(1, 6, 5, 4)), ValueError, r"out must have the output's shape"),
    "out-dtype": (dict(out=torch.empty(1, 6, 5, 5, dtype=torch.float16)), TypeError, "out dtype torch.float16"),
    "stride-zero": (dict(stride=0), ValueError, "stride must be >= 1"),
    "stride-negative": (dict(stride=(1, -2)), ValueError, "stride must be >= 1"),
    "stride-triple": (dict(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair of ints"),
    "stride-float": (dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1\.5"),
    "padding-bool": (dict(padding=(1, True)), TypeError, r"padding must be an int or a pair of ints, got \(1, True\)"),
    "dilation-zero": (dict(dilation=(0, 1)), ValueError, "dilation must be >= 1"),
    "padding-negative": (dict(padding=-1), ValueError, "padding must be >= 0"),
    "padding-past-int32": (dict(padding=(1, 2**31)), ValueError,
                           r"padding must be at most 2\^31-1, got \(1, 2147483648\)"),
    "stride-past-int32": (dict(stride=2**40), ValueError, r"stride must be at most 2\^31-1"),
    "dilation-past-int32": (dict(dilation=(2**31, 1)), ValueError, r"dilation must be at most 2\^31-1"),
    "groups-not-dividing": (dict(groups=3), ValueError, "groups=3 must divide the input channels 4"),
    "groups-zero": (dict(groups=0), ValueError, "groups must be a positive int"),
    "groups-bool": (dict(groups=True), ValueError, "groups must be a positive int, got True"),
    "no-weight": (dict(weight=None), TypeError, "weight must be a torch.Tensor, got NoneType"),
    # PyTorch's convolution returns (N, 0, P, Q) for C = 0, and raises its own errors for the others.
    "no-input-channels": (dict(x=torch.randn(1, 0, 5, 5), weight=torch.randn(6, 0, 3, 3)), ValueError,
                          r"x \(1, 0, 5, 5\) has an empty channel or spatial dimension"),
    "empty-height": (dict(x=torch.randn(1, 4, 0, 5)), ValueError,
                     r"x \(1, 4, 0, 5\) has an empty channel or spatial dimension"),
    "no-output-channels": (dict(weight=torch.randn(0, 4, 3, 3), bias=None), ValueError,
                           r"weight \(0, 4, 3, 3\) has an empty dimension"),
    "empty-filter": (dict(weight=torch.randn(6, 4, 0, 3)), ValueError, r"weight \(6, 4, 0, 3\) has an empty dimension"),
    "out-overlapping-itself": (dict(out=torch.empty(150).as_strided((1, 6, 5, 5), (150, 1, 5, 1))), ValueError,
                               r"out \(1, 6, 5, 5\) with strides \(150, 1, 5, 1\) has elements that share memory"),
    "out-expanded": (dict(out=torch.empty(1, 6, 1, 5).expand(1, 6, 5, 5)), ValueError, "has elements that share memory"),
    "unknown-backend": (dict(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
    "sparse-input": (dict(x=torch.randn(1, 4, 5, 5).to_sparse()), TypeError,
                     "x has layout torch.sparse_coo; the ops take dense"),
    "out-negated": (dict(out=torch.empty(1, 6, 5, 5, dtype=torch.complex64).conj().imag), ValueError,
                    "out is a lazily negated view"),
}


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input(name, backend):
    changes, error, match = BAD_INPUTS[name]
    args = valid_args() | {"backend": backend} | changes
    with pytest.raises(error, match=match):
        ops.conv2d(args.pop("x"), args.pop("weight"), **args)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_lazily_negated_inputs_are_read_as_their_values(backend):
    """z.conj().imag is a float view whose memory holds -values (the negative bit): the op goes
    through the dispatcher, which resolves it, so the kernels read the values themselves."""
    torch.manual_seed(0)
    conv = Conv(1, 4, 5, 5, 6, 3, 3, padding=1)
    x = torch.randn(1, 4, 5, 5, dtype=torch.complex64).conj().imag
    weight = torch.randn(6, 4, 3, 3, dtype=torch.complex64).conj().imag
    residual = torch.randn(1, 6, 5, 5, dtype=torch.complex64).conj().imag
    assert x.is_neg() and weight.is_neg() and residual.is_neg()
    out = ops.conv2d(x, weight, residual=residual, padding=1, relu=True, backend=backend)
    expected = reference_conv2d(conv, x.resolve_neg(), weight.resolve_neg(), None, residual.resolve_neg(), relu=True)
    assert_close_to_reference(out, expected, "conv")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("victim", ["x", "residual"])
def test_out_overlapping_an_input(victim, backend):
    x = torch.randn(1, 6, 5, 5)
    residual = torch.randn(1, 6, 5, 5)
    out = {"x": x, "residual": residual}[victim]
    with pytest.raises(ValueError, match=f"out overlaps {victim}"):
        ops.conv2d(x, torch.randn(6, 6, 3, 3), padding=1, residual=residual, out=out, backend=backend)
    with pytest.raises(ValueError, match="out overlaps x"):  # a view into the input's storage
        ops.conv2d(x, torch.randn(3, 6, 3, 3), padding=1, out=x[:, 2:5], backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_out_a_channel_slice_apart_from_the_slice_read(layout, backend):
    """Reading channels 0-3 of a buffer and writing channels 4-7 of it (a DenseNet block's pattern):
    their address ranges meet but no element is shared, so it runs and leaves the read slice as it
    was; a slice sharing one channel with the input is refused."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    buffer = torch.randn(2, 8, 5, 6).contiguous(memory_format=memory_format)
    buffer[:, 4:] = NAN
    x, weight = buffer[:, :4], torch.randn(4, 4, 3, 3)
    read = x.clone()
    ops.conv2d(x, weight, padding=1, relu=True, out=buffer[:, 4:], backend=backend)
    assert torch.equal(buffer[:, :4], read)
    conv = Conv(2, 4, 5, 6, 4, 3, 3, padding=1)
    assert_close_to_reference(buffer[:, 4:], reference_conv2d(conv, read, weight, relu=True), "conv")
    with pytest.raises(ValueError, match="out overlaps x"):
        ops.conv2d(buffer[:, :5], torch.randn(4, 5, 3, 3), padding=1, out=buffer[:, 4:], backend=backend)


def test_overlaps_agrees_with_the_addresses_views_cover():
    """ops.overlaps against the sets of addresses of random views (slices with steps) of small
    tensors in three layouts: never 'apart' where an address is shared."""
    rng = np.random.default_rng(0)
    checked = proven_apart = 0
    for _ in range(1500):
        shape = tuple(int(s) for s in rng.integers(1, 5, size=4))
        buffer = torch.empty(shape)
        buffer = [buffer, buffer.contiguous(memory_format=torch.channels_last), buffer.transpose(2, 3)][checked % 3]

        def view():
            bounds = [sorted(rng.integers(0, size + 1, size=2)) for size in buffer.shape]
            return buffer[tuple(slice(lo, max(hi, lo + 1), int(rng.choice([1, 1, 2]))) for lo, hi in bounds)]

        a, b = view(), view()
        if a.numel() == 0 or b.numel() == 0:
            continue

        def addresses(t):
            return {sum(i * s for i, s in zip(index, t.stride())) * t.element_size() + t.data_ptr()
                    for index in itertools.product(*map(range, t.shape))}

        shared = bool(addresses(a) & addresses(b))
        assert ops.overlaps(a, b) or not shared, (a.shape, a.stride(), b.shape, a.storage_offset(), b.storage_offset())
        checked += 1
        proven_apart += not shared and not ops.overlaps(a, b)
    assert checked > 500 and proven_apart > checked // 4


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_sharing_an_inputs_buffer_through_another_storage(backend):
    """Two tensors over one buffer, each with its own storage object (torch.from_numpy of two views
    of one array; DLPack does the same): the overlap is found by address."""
    buffer = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    x = torch.from_numpy(buffer).view(1, 8, 8, 8)
    out = torch.from_numpy(buffer[64:352]).view(1, 8, 6, 6)
    assert x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="out overlaps x"):
        ops.conv2d(x, torch.randn(8, 8, 3, 3), out=out, backend=backend)
    apart = torch.from_numpy(np.empty(288, dtype=np.float32)).view(1, 8, 6, 6)
    ops.conv2d(x, torch.randn(8, 8, 3, 3), out=apart, backend=backend)  # another buffer: accepted


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_an_inference_tensor_out_is_written_only_in_inference_mode(backend):
    """As PyTorch's own in-place ops: an inference tensor cannot be updated outside inference_mode."""
    with torch.inference_mode():
        out = torch.full((1, 6, 5, 5), NAN)
    x, weight, bias = (valid_args()[name] for name in ("x", "weight", "bias"))
    with pytest.raises(RuntimeError, match=r"out was made under torch.inference_mode\(\)"):
        ops.conv2d(x, weight, bias, padding=1, out=out, backend=backend)
    assert out.isnan().all()  # refused before anything was written
    with torch.inference_mode():
        ops.conv2d(x, weight, bias, padding=1, out=out, backend=backend)
    assert_close_to_reference(out, F.conv2d(x.double(), weight.double(), bias.double(), padding=1), "conv")


@pytest.mark.parametrize("strides, overlapping", [
    ((150, 1, 30, 6), False),  # channels_last
    ((300, 1, 60, 12), False),  # a channel slice of a 12-channel channels_last tensor
    ((150, 25, 5, 1), False),  # NCHW
    ((1, 1, 30, 6), False),  # batch 1: its stride does not count
    ((150, 1, 6, 30), False),  # H and W transposed
    ((150, 1, 5, 1), True),  # a row's pixels on one another's channels
    ((150, 1, 30, 0), True),  # expanded
    ((150, 2, 30, 6), True),  # channels two apart in a 6-wide pixel
], ids=["channels-last", "channel-slice", "nchw", "batch-1", "transposed", "overlapping", "expanded", "wide-channels"])
def test_overlaps_itself(strides, overlapping):
    assert ops.overlaps_itself(torch.empty(1000).as_strided((1, 6, 5, 5), strides)) is overlapping


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", ["x", "weight", "bias", "residual"])
def test_requires_grad_rejected(name, backend):
    args = valid_args() | {"residual": torch.randn(1, 6, 5, 5)}
    args[name].requires_grad_(True)
    call = lambda: ops.conv2d(args["x"], args["weight"], args["bias"], padding=1, residual=args["residual"],
                              backend=backend)
    with pytest.raises(RuntimeError, match=f"{name} requires grad"):
        call()
    with torch.no_grad():  # no autograd, no complaint
        call()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_autocast_does_not_change_what_the_op_computes(backend, channels_last):
    """Under torch.autocast the op computes in its inputs' dtype, as a compiled kernel does: the
    torch backends' PyTorch convolution would otherwise run in bfloat16, and return it for
    channels_last input but not for NCHW."""
    conv = Conv(2, 4, 6, 5, 8, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, res = torch.randn(2, 4, 6, 5), torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(2, 8, 6, 5)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_conv2d(conv, x, weight, bias, res, relu=True, backend=backend)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def test_groups_on_triton_not_implemented():
    with pytest.raises(NotImplementedError, match="backend 'triton' supports groups=1 only, got groups=2"):
        ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3), groups=2, backend="triton")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("w", [1, 2])
def test_narrow_map_with_a_dilated_one_tap_filter(w, r, dtype, backend):
    """A 1- or 2-wide channels_last map, a 1-wide filter with dilation 2 along it, stride 2 and
    padding 1: PyTorch's CPU float16/bfloat16 convolution crashes on this layer as given; the
    dilation of a one-tap dimension changes nothing and is dropped before it (the torch backends)."""
    conv = Conv(2, 3, 5, w, 8, r, 1, stride=(1, 2), padding=(1, 1), dilation=(2, 2))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, w).to(dtype).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 3, r, 1).to(dtype), torch.randn(8)
    out = run_conv2d(conv, x, weight, bias, relu=True, backend=backend)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, relu=True), "conv")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("conv", [Conv(2, 8, 6, 3, 4, 1, 3, stride=(1, 2)), Conv(1, 16, 14, 2, 32, 3, 3, stride=2, padding=1),
                                  Conv(2, 8, 3, 6, 4, 3, 1, stride=(2, 1)), Conv(1, 8, 2, 2, 4, 2, 2, stride=3)],
                         ids=["one-column", "one-column-3x3", "one-row", "one-pixel"])
def test_strided_output_one_pixel_wide(conv, channels_last, dtype, backend):
    """An output one pixel wide (or high) at a stride above 1: PyTorch's CPU bfloat16 convolution
    returns garbage or NaN for it; the stride, which changes nothing there, is dropped before it."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = run_conv2d(conv, x, weight, bias, res, relu=True, backend=backend)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def test_triton_refuses_maps_past_its_32_bit_pixel_coordinates():
    """A padded input 2^31 wide, or an output map of 2^31 pixels, is refused by the Triton launcher
    (its coordinates within an image are 32-bit); the torch backends run the padded layer."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    wide = dict(padding=(1, 2**30), stride=(1, 2**30))  # a 5 x 3 output over a 5 x (2^31 + 5) padded input
    with pytest.raises(NotImplementedError, match=r"padding \(1, 1073741824\) makes it 7 x 2147483653, 2\^31 or more"):
        ops.conv2d(x, weight, backend="triton", **wide)
    out = ops.conv2d(x, weight, backend="torch", **wide)
    conv = Conv(1, 4, 5, 5, 6, 3, 3, stride=(1, 2**30), padding=(1, 2**30))
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, None, None, relu=False), "conv")
    huge_out = torch.empty(1).as_strided((1, 1, 2**16, 2**15), (0, 0, 0, 0))  # the launcher reads its shape only
    with pytest.raises(NotImplementedError, match="a 65536 x 32768 map has 2\\^31 or more"):
        conv2d_bias_act(x, weight, None, None, huge_out, (1, 1), (0, 0), (1, 1), False)


@pytest.mark.parametrize("backend", ["torch", "torch_triton"])
@pytest.mark.parametrize("groups", [2, 4])
def test_groups_match_reference(groups, backend):
    conv = Conv(2, 8, 5, 6, 12, 3, 3, padding=1)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    weight = torch.randn(12, 8 // groups, 3, 3)
    bias, res = torch.randn(12), torch.randn(2, 12, 5, 6)
    out = ops.conv2d(x, weight, bias, padding=1, groups=groups, residual=res, relu=True, backend=backend)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True, groups=groups), "conv")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(RuntimeError, match="conv2d: backend 'cuda' needs CUDA tensors"):
        ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), backend="cuda")


def test_cuda_backend_runs_float32_only_as_tf32(monkeypatch):
    # Meta tensors pass the device check, so the dtype check is what speaks.
    x, weight = torch.empty(1, 8, 5, 5, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with pytest.raises(NotImplementedError, match="computes float32 as TF32 only, and PyTorch's convolutions are set to IEEE"):
        ops.conv2d(x, weight, backend="cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert ops.conv2d(x, weight, backend="cuda").shape == (1, 8, 3, 3)


def test_tf32_setting_is_read_under_torch_compile(monkeypatch, precision_settings):
    """torch.compile(fullgraph=True) traces the legacy flag where it answers (and recompiles when it
    changes); where the per-op settings were set apart it cannot trace the flag's raise, and takes
    their resolution as a constant."""
    torch._dynamo.reset()

    def sign(x):
        return x + 1 if tf32_allowed("conv") else x - 1

    compiled = torch.compile(sign, fullgraph=True, backend="eager")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert compiled(torch.zeros(1)).item() == 1
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert compiled(torch.zeros(1)).item() == -1
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = "ieee", "tf32"
    torch._dynamo.reset()
    assert torch.compile(sign, fullgraph=True, backend="eager")(torch.zeros(1)).item() == -1
    x = torch.empty(1, 8, 5, 5, device="meta")
    refusal = torch.compile(lambda x: ops.conv2d_backend_refusal(x, 1, True, "cuda") is None, fullgraph=True,
                            backend="eager")
    assert refusal(x) is False
    torch._dynamo.reset()


@pytest.mark.parametrize("conv, rnn, cudnn, generic, tf32", [
    ("ieee", "tf32", "none", "none", False),  # the legacy flag raises here: conv and rnn differ
    ("tf32", "ieee", "none", "none", True),
    ("none", "ieee", "tf32", "none", True),
    ("none", "tf32", "none", "ieee", False),
    ("none", "none", "none", "none", False),  # what torch.backends.cudnn.allow_tf32 = False leaves
])
def test_convolutions_follow_the_per_op_precision_settings(monkeypatch, precision_settings, conv, rnn, cudnn, generic,
                                                           tf32):
    """torch.backends.cudnn.conv.fp32_precision and the levels above it, as PyTorch resolves them:
    the CUTLASS conv refuses IEEE float32 with its own error (not the legacy flag's RuntimeError),
    the Triton conv's dot precision follows, and the matmul's setting stays apart."""
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = conv, rnn
    torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision = cudnn, generic
    torch.backends.cuda.matmul.fp32_precision = "ieee" if tf32 else "tf32"
    assert tf32_allowed("conv") == tf32 and tf32_allowed("matmul") != tf32
    x, weight = torch.empty(1, 8, 5, 5, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    if tf32:
        assert ops.conv2d(x, weight, backend="cuda").shape == (1, 8, 3, 3)
    else:
        with pytest.raises(NotImplementedError, match="computes float32 as TF32 only"):
            ops.conv2d(x, weight, backend="cuda")
    monkeypatch.setattr(conv2d_module, "INTERPRETED", False)  # the interpreter has no TF32: IEEE there
    assert conv2d_module.dot_precision(torch.empty(1, device="meta")) == ("tf32" if tf32 else "ieee")
    assert conv2d_module.dot_precision(torch.empty(1, device="meta", dtype=torch.bfloat16)) == "ieee"


def test_default_backend_keeps_ieee_float32_off_the_tf32_kernel(monkeypatch):
    # Were the tuning table to pick "cuda" for float32, turning TF32 off moves the call to cuDNN.
    chosen = []
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: backend or "cuda")
    monkeypatch.setattr(ops, "_conv2d_dispatch", lambda *args: chosen.append(args[-1]))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3))
    assert chosen == ["torch"]


@pytest.mark.parametrize(
    "dtype, c, k, pixel_stride, match",
    [(1, 12, 16, 16, "C=12 must be a multiple of 8"), (1, 16, 20, 24, "K=20 must be a multiple of 8"),
     (0, 6, 16, 16, "C=6 must be a multiple of 4"), (3, 16, 16, 16, "unknown dtype code 3"),
     (1, 16, 16, 8, "pixel stride 8 must be >= K=16"), (1, 16, 16, 20, "pixel stride 20 must be >= K=16 and a multiple of 8")],
    ids=["channels", "filters", "float32-channels", "dtype", "pixel-stride-short", "pixel-stride-unaligned"],
)
def test_cuda_kernel_refuses_what_it_does_not_support_without_a_gpu(dtype, c, k, pixel_stride, match):
    # The CUTLASS kernel's own checks run before it looks for a device, so they are testable here.
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")
    with pytest.raises(ValueError, match=match):
        cuda_extension().conv2d(16, 16, 0, 0, 16, pixel_stride, dtype, 1, c, 8, 8, k, 3, 3, (1, 1), (1, 1), (1, 1),
                                True, 0)


def test_cuda_kernel_refuses_a_dilation_past_int_range():
    # A 1x1 filter passes the dilated-extent checks with any dilation; CUTLASS holds it as int.
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")
    with pytest.raises(ValueError, match=r"dilation 2147483648x1 is outside 1..2\^31-1"):
        cuda_extension().conv2d(16, 16, 0, 0, 16, 16, 1, 1, 16, 8, 8, 16, 1, 1, (0, 0), (1, 1), (2**31, 1), True, 0)


@pytest.mark.parametrize("size, padding, stride", [(2, 0, 2), (2, 0, 3), (1, 0, 4), (3, 0, 1)],
                         ids=["overhang-1-stride-2", "overhang-1-stride-3", "overhang-2-stride-4", "overhang-0-stride-1"])
def test_cuda_kernel_refuses_a_filter_larger_than_the_padded_input(size, padding, stride):
    # PyTorch's output-size formula truncates toward zero, so a 3x3 filter overhanging a 2x2 input by
    # less than the stride gives one output pixel; the extension compares the extents themselves.
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")
    kernel = 4 if size == 3 else 3
    for h, w in ((size, 8), (8, size)):
        with pytest.raises(ValueError, match="the dilated filter is larger than the padded input"):
            cuda_extension().conv2d(16, 16, 0, 0, 16, 16, 1, 1, 16, h, w, 16, kernel, kernel, (padding, padding),
                                    (stride, stride), (1, 1), True, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the call would launch on fake pointers")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cutlass_accepts_every_layer_without_a_gpu(arch):
    """Every distinct conv layer of the architecture (C and K padded to 8 as the launcher pads them),
    at batch 1 and 256, in every dtype, with and without ReLU and a residual: the extension's checks
    and CUTLASS's own host-side can_implement of the kernel it picks (fprop or the 1x1 GEMM) accept
    it, so only the missing GPU stops the call. Fake 16-byte aligned pointers stand in for tensors."""
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")
    for problem in conv_problems(analyze_arch(arch)):
        c, k = ops._cutlass_channels(problem.C), ops._cutlass_channels(problem.K)
        cases = itertools.product((1, 256), (0, 1, 2), (True, False), (0, 256), (k, k + 8))
        for batch, dtype, relu, residual, pixel_stride in cases:  # k + 8: a channel slice (Inception)
            with pytest.raises(RuntimeError, match="no CUDA device"):
                cuda_extension().conv2d(256, 256, 256, residual, 256, pixel_stride, dtype, batch, c, problem.H,
                                        problem.W, k, problem.R, problem.S, problem.padding, problem.stride, (1, 1),
                                        relu, 0)


@pytest.mark.parametrize(
    "dtype, k, kernel, stride, padding, relu, expected",
    [(2, 64, 3, 1, 1, True, ("fprop", 128, 64, 64)), (1, 192, 3, 1, 1, True, ("fprop", 128, 128, 64)),
     (2, 320, 3, 2, 1, True, ("fprop", 128, 128, 64)), (2, 8, 7, 2, 3, True, ("fprop", 128, 64, 64)),
     (2, 96, 3, 1, 1, True, ("fprop", 128, 128, 64)), (2, 64, 3, 1, 1, False, ("fprop", 128, 128, 64)),
     (0, 64, 3, 1, 1, True, ("fprop", 128, 128, 32)), (0, 256, 1, 1, 0, False, ("fprop", 128, 128, 32)),
     (1, 256, 1, 1, 0, True, ("gemm-pingpong", 128, 128, 64)), (2, 72, 1, 1, 0, True, ("gemm-pingpong", 128, 128, 64)),
     (2, 64, 1, 1, 0, True, ("fprop", 128, 64, 64)), (2, 256, 1, 1, 0, False, ("fprop", 128, 128, 64)),
     (2, 512, 1, 2, 0, True, ("fprop", 128, 128, 64)), (2, 256, 1, 1, 1, True, ("fprop", 128, 128, 64)),
     (0, 256, 1, 1, 0, True, ("fprop", 128, 128, 32))],
    ids=["bf16-k64", "f16-k192", "bf16-k320-s2", "bf16-stem-k8", "bf16-k96", "bf16-k64-no-relu", "tf32-k64",
         "tf32-1x1", "f16-1x1-k256", "bf16-1x1-k72", "bf16-1x1-k64", "bf16-1x1-no-relu", "bf16-1x1-stride2",
         "bf16-1x1-padded", "tf32-1x1-relu"],
)
def test_cuda_conv_kernel_choice(dtype, k, kernel, stride, padding, relu, expected):
    """The CUTLASS conv runs 64-wide tiles for K <= 64, where 128-wide ones would leave half their
    output channels idle (compiled for float16/bfloat16 with ReLU only), and a 1x1 stride-1
    unpadded ReLU layer with K > 64 in float16/bfloat16 as a GEMM on the persistent ping-pong kernel."""
    from cnnfast.backends import cuda_extension

    choice = cuda_extension().conv2d_kernel(dtype, k, kernel, kernel, (padding, padding), (stride, stride), relu)
    assert choice == expected


@pytest.mark.parametrize(
    "dtype, k, kernel, stride, padding, relu, schedule, expected",
    [(2, 256, 1, 1, 0, True, "fprop", ("fprop", 128, 128, 64)), (1, 64, 1, 1, 0, True, "fprop", ("fprop", 128, 64, 64)),
     (2, 96, 3, 1, 1, True, "fprop", ("fprop", 128, 128, 64)), (2, 256, 1, 1, 0, True, "auto", ("gemm-pingpong", 128, 128, 64)),
     (1, 72, 1, 1, 0, True, "gemm-pingpong", ("gemm-pingpong", 128, 128, 64))],
    ids=["1x1-forced-fprop", "1x1-k64-forced-fprop", "3x3-forced-fprop", "1x1-auto", "1x1-forced-gemm"],
)
def test_cuda_conv_schedule_can_be_forced(dtype, k, kernel, stride, padding, relu, schedule, expected):
    """A schedule passed to the extension overrides its rule: the fprop always applies (with the
    rule's tile width), the GEMM where a 1x1 stride-1 layer allows it."""
    from cnnfast.backends import cuda_extension

    assert cuda_extension().conv2d_kernel(dtype, k, kernel, kernel, (padding, padding), (stride, stride), relu,
                                          schedule) == expected


@pytest.mark.parametrize(
    "k, kernel, stride, padding, relu, dtype, match",
    [(96, 3, 1, 1, True, 2, "got 3x3 stride 1x1 padding 1x1 K=96"), (64, 1, 1, 0, True, 2, "got 1x1 stride 1x1 padding 0x0 K=64"),
     (96, 1, 2, 0, True, 1, "stride 2x2"), (96, 1, 1, 0, False, 2, "without ReLU"), (96, 1, 1, 0, True, 0, "in float32")],
    ids=["3x3", "k64", "stride-2", "no-relu", "float32"],
)
def test_cuda_conv_refuses_a_forced_gemm_where_it_does_not_apply(k, kernel, stride, padding, relu, dtype, match):
    # Both the kernel query and the conv itself (whose checks run before it looks for a GPU).
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")
    with pytest.raises(ValueError, match=f"gemm-pingpong kernel runs only 1x1.*{match}"):
        cuda_extension().conv2d_kernel(dtype, k, kernel, kernel, (padding, padding), (stride, stride), relu,
                                       "gemm-pingpong")
    with pytest.raises(ValueError, match=f"gemm-pingpong kernel runs only 1x1.*{match}"):
        cuda_extension().conv2d(256, 256, 0, 0, 256, k, dtype, 2, 64, 8, 8, k, kernel, kernel, (padding, padding),
                                (stride, stride), (1, 1), relu, 0, "gemm-pingpong")
    with pytest.raises(ValueError, match=f"gemm-pingpong kernel runs only 1x1.*{match}"):  # batch 0 runs nothing
        cuda_extension().conv2d(256, 256, 0, 0, 256, k, dtype, 0, 64, 8, 8, k, kernel, kernel, (padding, padding),
                                (stride, stride), (1, 1), relu, 0, "gemm-pingpong")
    with pytest.raises(ValueError, match="unknown conv2d schedule 'gemm' \\(auto, fprop, gemm-pingpong\\)"):
        cuda_extension().conv2d_kernel(dtype, k, kernel, kernel, (padding, padding), (stride, stride), relu, "gemm")


@pytest.mark.parametrize(
    "k, kernel, stride, padding, expected",
    [(60, (1, 1), (1, 1), (0, 0), "cutlass-fprop-128x64x64"), (65, (1, 1), (1, 1), (0, 0), "cutlass-gemm-pingpong-128x128x64"),
     (96, (1, 1), (1, 2), (0, 0), "cutlass-fprop-128x128x64"), (96, (1, 1), (1, 1), (0, 1), "cutlass-fprop-128x128x64"),
     (96, (1, 3), (1, 1), (0, 1), "cutlass-fprop-128x128x64")],
    ids=["k60-pads-to-64", "k65-pads-to-72", "stride-1x2", "padding-0x1", "1x3"],
)
def test_cuda_conv_kernel_name_follows_the_launcher(k, kernel, stride, padding, expected):
    """ops.cuda_conv2d_kernel names the kernel for K as the launcher pads it (to a multiple of 8),
    and only a 1x1 filter with stride 1 and no padding in both directions is a GEMM."""
    if "conv2d" not in backends.cuda_ops():
        pytest.skip("cnnfast._C was built without CUTLASS")
    assert ops.cuda_conv2d_kernel(torch.bfloat16, k, kernel, stride, padding, relu=True) == expected


def test_cuda_conv_kernel_name_takes_sizes_as_conv2d_does():
    if "conv2d" not in backends.cuda_ops():
        pytest.skip("cnnfast._C was built without CUTLASS")
    pairs = ops.cuda_conv2d_kernel(torch.bfloat16, 96, (3, 3), (2, 2), (1, 1), relu=True)
    assert ops.cuda_conv2d_kernel(torch.bfloat16, 96, 3, 2, 1, relu=True) == pairs
    with pytest.raises(ValueError, match="cuda_conv2d_kernel: stride must be >= 1, got 0"):
        ops.cuda_conv2d_kernel(torch.bfloat16, 96, 3, 0, 1, relu=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv", [Conv(2, 3, 9, 11, 13, 7, 7, stride=2, padding=3), Conv(1, 16, 5, 5, 8, 3, 3, padding=1)],
                         ids=["stem-c3-k13", "c16-k8"])
def test_cutlass_operands_are_dense_aligned_and_exact(conv, layout):
    """The CUDA launcher's operand preparation (ops._cutlass_operands), checked on the CPU: every
    operand dense channels_last and 16-byte aligned with C and K padded to multiples of 8 by zeros,
    and the first K channels of the padded convolution equal the original one."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, torch.float16, bias_dtype=torch.float16)
    x, weight, res = in_layout(x, layout), in_layout(weight, layout), in_layout(res, layout)
    out = nan_output(conv.output_shape(), torch.float16)
    xp, wp, bp, rp, kernel_out, pixel_stride = ops._cutlass_operands(x, weight, bias, res, out)
    c8, k8 = -(-conv.c // 8) * 8, -(-conv.k // 8) * 8
    assert xp.shape[1] == c8 and tuple(wp.shape[:2]) == (k8, c8) and bp.shape == (k8,) and rp.shape[1] == k8
    assert tuple(kernel_out.shape) == (conv.n, k8, *out.shape[2:]) and pixel_stride == k8
    for t in (xp, wp, rp, kernel_out):
        assert t.is_contiguous(memory_format=CHANNELS_LAST) and t.data_ptr() % 16 == 0
    assert bp.dtype == torch.float32 and bp.is_contiguous()
    assert (kernel_out is out) == (conv.k % 8 == 0)  # a padded K goes through scratch and a copy
    for padding in (xp[:, conv.c :], wp[:, conv.c :], wp[conv.k :], bp[conv.k :], rp[:, conv.k :]):
        assert not padding.any()
    padded = reference_conv2d(conv, xp, wp, bp, rp)[:, : conv.k]
    torch.testing.assert_close(padded, reference_conv2d(conv, x, weight, bias, res), rtol=1e-12, atol=1e-12)


def test_triton_without_interpreter_needs_cuda_tensors(monkeypatch):
    monkeypatch.setattr(backends, "TRITON_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors, got a tensor on cpu"):
        ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), backend="triton")


def test_an_out_that_overlaps_an_input_is_refused_in_a_compiled_graph_too():
    """The compiled graph may hand the op out itself (inductor writes in place where eager would
    copy): the op checks the tensors it runs on, so the overlap eager refuses is refused there too,
    or the graph gave the op a buffer of its own and the result is right."""
    torch.manual_seed(0)
    weight = torch.randn(8, 8, 3, 3)

    def overlapping(big):
        # The Triton kernel reads x while it writes out (PyTorch's would compute before writing).
        ops.conv2d(big[:, :8], weight, padding=1, out=big[:, 4:12], backend="triton")
        return big

    big = torch.randn(2, 16, 6, 6).contiguous(memory_format=CHANNELS_LAST)
    with pytest.raises(ValueError, match="out overlaps x"):
        overlapping(big.clone())
    expected = big.double()
    expected[:, 4:12] = F.conv2d(expected[:, :8], weight.double(), padding=1)
    try:
        got = torch.compile(overlapping, fullgraph=True)(big.clone())
    except ValueError as error:  # raised inside the compiled graph
        assert "out overlaps x" in str(error)
    else:
        assert_close_to_reference(got, expected, "conv")


def test_out_written_by_a_kernel_moves_its_version_as_an_in_place_op_would():
    """A tensor autograd saved for backward, overwritten through out=: backward must refuse."""
    a = torch.randn(1, 8, 4, 4, requires_grad=True)
    saved = torch.exp(a)  # exp's backward reads its output
    x = torch.randn(1, 8, 4, 4)
    weight = torch.randn(8, 8, 1, 1)
    with torch.no_grad():
        before = saved._version
        ops.conv2d(x, weight, out=saved, backend="triton")
    assert saved._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("call", [
    lambda x: torch.ops.cnnfast.conv2d(x, torch.randn(2, 3, 1, 1), None, None, [1, 1], [0, 0], [1, 1], 1, False,
                                       "torch"),
    lambda x: torch.ops.cnnfast.global_avg_pool(x, "torch"),
    lambda x: torch.ops.cnnfast.add_relu(x, x, True, "torch"),
    lambda x: torch.ops.cnnfast.gap_linear(x, torch.randn(2, 3), None, "torch"),
], ids=["conv2d", "global_avg_pool", "add_relu", "gap_linear"])
def test_the_ops_called_directly_refuse_inputs_that_require_grad(call):
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad, but cnnfast ops have no backward"):
        call(x)
    with torch.no_grad():
        call(x)
