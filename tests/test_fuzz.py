"""Property tests: random problems for each public op on the Triton backend (under the
interpreter on a CPU) against a float64 reference.

Two value modes per example:
- integer values: small integers in every input, so every product and partial sum is exact in
  float32 accumulation; the kernel's single rounding to the output dtype must then equal the
  float64 reference rounded once to that dtype, bit for bit (for float32, the reference itself);
- random normal values, compared with the tolerance table (cnnfast.testing).

Hypothesis runs derandomized (the same examples on every run), CNNFAST_FUZZ_EXAMPLES examples
per op (default 200), and half as many again for the convolutions the TMA kernels may take. The
interpreter is slow, so shapes stay tiny: at the default the file takes about 90 s on a
2-core CPU, conv2d most of it (`--hypothesis-show-statistics` shows how many examples were
kernels larger than the padded input, which must raise, and how many batch 0, and which kernel
the TMA examples expected).
"""
import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from cnnfast import backends, ops
from cnnfast.testing import assert_close_to_reference
from tests.test_conv2d import LAYOUTS, Conv, in_layout, make_inputs, nan_output, reference_conv2d, run_conv2d
from tests.test_add_relu import reference_add_relu
from tests.test_gap_linear import make_head, reference_gap_linear
from tests.test_global_avg_pool import reference_global_avg_pool, unwritten_reads_nan

pytestmark = pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton kernels on CPU tensors")

EXAMPLES = int(os.environ.get("CNNFAST_FUZZ_EXAMPLES", "200"))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fuzz_settings(examples):
    # No explain phase: on a failure it reruns the kernel hundreds of times under the interpreter.
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def integers(shape, low, high):
    """Integer values in [low, high] as float32 (cast to the op's dtype by the caller)."""
    return torch.randint(low, high + 1, shape).float()


def check(actual, reference, kind, exact):
    """Exact: the float64 reference rounded once to the output dtype; otherwise the tolerance table."""
    if exact:
        assert_close_to_reference(actual, reference.to(actual.dtype).double(), kind, exact=True)
    else:
        assert_close_to_reference(actual, reference, kind)


# ---------------------------------------------------------------- conv2d


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_conv2d(data):
    draw = data.draw
    n = draw(st.sampled_from((1, 2, 3, 0)))  # batch 0 kept, but not as the most likely
    # C picks the kernel's reduction order: up to 40 channels mostly the flat one; 16, 32 (full
    # channel blocks) and 65, 72 (a partial last block) the channel-blocked one.
    c = draw(st.one_of(st.integers(1, 40), st.sampled_from((16, 32, 65, 72))))
    k = draw(st.integers(1, 40))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dtype = draw(st.sampled_from(DTYPES))
    exact = draw(st.booleans())
    x_layout, w_layout = draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))
    bias_dtype = draw(st.sampled_from([None, torch.float32, dtype]))
    residual, res_layout = draw(st.booleans()), draw(st.sampled_from(LAYOUTS))
    relu, into_slice = draw(st.booleans()), draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))

    conv = Conv(n, c, h, w, k, r, s, stride, padding, dilation)
    too_large = any(d * (size - 1) + 1 > extent + 2 * pad
                    for d, size, extent, pad in zip(dilation, (r, s), (h, w), padding))
    event("kernel larger than the padded input" if too_large else f"batch {n}")
    if too_large:
        x, weight = torch.zeros(n, c, h, w, dtype=dtype), torch.zeros(k, c, r, s, dtype=dtype)
        with pytest.raises(ValueError, match="larger than the padded input"):
            run_conv2d(conv, x, weight)
        return

    if exact:  # |x|, |w| <= 2 and C*R*S <= 1800: every sum stays below 2^13, exact in float32
        x, weight = integers((n, c, h, w), -2, 2), integers((k, c, r, s), -2, 2)
        bias = None if bias_dtype is None else integers((k,), -3, 3)
        res = integers(conv.output_shape(), -3, 3) if residual else None
    else:
        x, weight, bias, res = make_inputs(conv, dtype, bias_dtype=bias_dtype, residual=residual)
    x, weight = in_layout(x.to(dtype), x_layout), in_layout(weight.to(dtype), w_layout)
    bias = None if bias is None else bias.to(bias_dtype)
    res = None if res is None else in_layout(res.to(dtype), res_layout)

    out, big = None, None
    if into_slice:
        first, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        big = nan_output((n, first + k + after, *conv.output_shape()[2:]), dtype)
        out = big[:, first : first + k]
    with unwritten_reads_nan(x.device):
        result = run_conv2d(conv, x, weight, bias, res, relu, out=out)
    assert result.shape == conv.output_shape() and result.dtype == dtype
    check(result, reference_conv2d(conv, x, weight, bias, res, relu), "conv", exact)
    if into_slice:
        assert result is out
        assert big[:, :first].isnan().all() and big[:, first + k :].isnan().all()


def nan_map_holding(t, layout):
    """t's values in channels_last memory, "dense", or as a view of a larger NaN-filled channels_last
    map: "crop" (rows 1.., columns 2..) or "channel_slice" (channels 8.. of C + 16)."""
    n, c, h, w = t.shape
    if layout == "dense":
        return t.contiguous(memory_format=torch.channels_last)
    extra = (0, 2, 3) if layout == "crop" else (16, 0, 0)
    big = nan_output((n, c + extra[0], h + extra[1], w + extra[2]), t.dtype)
    view = big[:, 8 : 8 + c] if layout == "channel_slice" else big[:, :, 1 : 1 + h, 2 : 2 + w]
    view.copy_(t)
    return view


def tma_kernel_expected(conv: Conv, x_layout: str, out_aligned: bool) -> str:
    """Which kernel the documented conditions give a float16/bfloat16 layer with C and K multiples
    of 8 and a channels_last weight: conv2d_pointwise for unpadded 1x1 stride-1 layers over pixel
    rows (a dense map or a channel slice of one, a crop only along one dimension);
    conv2d_spatial for larger filters at a stride that divides the map (with a column stride: a
    row's pixels dense, so no channel slice, and C a multiple of the interpreter's 16-channel
    block) and for unpadded strided 1x1 layers; the implicit GEMM otherwise, and wherever out is
    a channel slice off the 16-byte grid."""
    one_by_one = (conv.r, conv.s) == (1, 1)
    unpadded = tuple(conv.padding) == (0, 0)
    stride_h, stride_w = conv.stride
    if not out_aligned or conv.n == 0:
        return "implicit_gemm"
    if one_by_one and (stride_h, stride_w) == (1, 1):
        # A crop's pixels are rows one pitch apart only along one dimension of more than one pixel.
        rows = x_layout != "crop" or sum(size > 1 for size in (conv.n, conv.h, conv.w)) <= 1
        return "conv2d_pointwise" if unpadded and rows else "implicit_gemm"
    if one_by_one:
        return "conv2d_spatial" if unpadded else "implicit_gemm"
    divides = conv.h % stride_h == 0 and conv.w % stride_w == 0
    merged = stride_w == 1 or (x_layout != "channel_slice" and conv.c % 16 == 0)
    return "conv2d_spatial" if divides and merged else "implicit_gemm"


@fuzz_settings(EXAMPLES // 2)
@given(data=st.data())
def test_conv2d_where_the_tma_kernels_may_run(data):
    """Random problems of the kind the TMA kernels take or narrowly refuse: float16/bfloat16,
    channels_last weight, C and K multiples of 8, 1x1 to 5x5 filters at strides 1 to 3 on maps
    that the stride divides or not, x dense, cropped or a channel slice of a NaN-filled map, out
    new or a channel slice on or off the 16-byte grid. The result must match float64 and the
    kernel that ran must be the one tma_kernel_expected names."""
    from cnnfast.triton_kernels import conv2d_pointwise, conv2d_spatial

    draw = data.draw
    # Each kind of layer as likely as the others; the sizes then decide which kernel takes it.
    kind = draw(st.sampled_from(("1x1", "strided 1x1", "filter", "strided filter")))
    n = draw(st.sampled_from((1, 2, 3)))
    c, k = 8 * draw(st.integers(1, 6)), 8 * draw(st.integers(1, 5))
    if kind.endswith("1x1"):
        r = s = 1
        padding = (draw(st.sampled_from((0, 0, 0, 1))),) * 2
    else:
        r, s = draw(st.sampled_from((1, 2, 3, 5))), draw(st.sampled_from((2, 3, 5)))
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    stride = (draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((2, 3)))) if kind.startswith("strided") else (1, 1)
    # Up to 6 rows and 10 columns of each phase: outputs that pass the interpreter's 4x8-pixel tile.
    h, w = (stride[0] * draw(st.integers(1, 6)) + draw(st.sampled_from((0, 0, 0, 1))),
            stride[1] * draw(st.integers(1, 10)) + draw(st.sampled_from((0, 0, 0, 1))))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    conv = Conv(n, c, h, w, k, r, s, stride, padding, dilation)
    # A filter larger than the padded input is an error, which test_conv2d covers.
    assume(h + 2 * padding[0] > dilation[0] * (r - 1) and w + 2 * padding[1] > dilation[1] * (s - 1))
    dtype = draw(st.sampled_from((torch.float16, torch.bfloat16)))
    exact, relu, residual = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    x_layout = draw(st.sampled_from(("dense", "crop", "channel_slice")))
    first, after = draw(st.sampled_from(((None, None), (0, 8), (8, 0), (3, 5), (8, 4))))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if exact:
        x, weight, bias = integers((n, c, h, w), -3, 3), integers((k, c, r, s), -2, 2), integers((k,), -3, 3)
        res = integers(conv.output_shape(), -3, 3) if residual else None
    else:
        x, weight, bias, res = make_inputs(conv, dtype, residual=residual)
    x = nan_map_holding(x.to(dtype), x_layout)
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    res = None if res is None else res.to(dtype).contiguous(memory_format=torch.channels_last)
    out, big = None, None
    p, q = conv.output_shape()[2:]
    if first is not None:
        big = nan_output((n, first + k + after, p, q), dtype)
        out = big[:, first : first + k]
    # A single output pixel has no pitch to align.
    out_aligned = first is None or (first % 8 == 0 and ((first + k + after) % 8 == 0 or n * p * q == 1))
    expected_kernel = tma_kernel_expected(conv, x_layout, out_aligned)
    event(kind)
    event(expected_kernel + (" (strided filter)" if (r, s) != (1, 1) and stride != (1, 1)
                             and expected_kernel != "implicit_gemm" else ""))
    launched = []
    with contextlib.ExitStack() as stack:
        for module in (conv2d_pointwise, conv2d_spatial):
            launch = module.launch
            name = module.__name__.rsplit(".", 1)[-1]
            recorded = lambda *a, _launch=launch, _name=name, **kw: launched.append(_name) or _launch(*a, **kw)
            stack.enter_context(mock.patch.object(module, "launch", recorded))
        stack.enter_context(unwritten_reads_nan(x.device))
        result = run_conv2d(conv, x, weight, bias, res, relu, out=out)
    assert launched == ([] if expected_kernel == "implicit_gemm" else [expected_kernel]), (conv, x_layout, first)
    check(result, reference_conv2d(conv, x, weight, bias, res, relu), "conv", exact)
    if big is not None:
        assert big[:, :first].isnan().all() and big[:, first + k :].isnan().all()


# ---------------------------------------------------------------- the memory-bound ops


def draw_shape(draw):
    """(N, C, H, W); C past 64 at times: the interpreter's kernels take 64 channels a program, and an
    index bug in the channel blocks shows only with two or more."""
    n = draw(st.sampled_from((1, 2, 3, 0)))
    c = draw(st.one_of(st.integers(1, 40), st.sampled_from((64, 65, 130))))
    return (n, c, draw(st.integers(1, 12)), draw(st.integers(1, 12)))


def exact_pooling_input(shape):
    """Integers whose mean over each (n, c) plane is an integer v in [-8, 8]: v plus q minus q
    shifted by one pixel (which sums to zero), so the pooled sum and its division are exact
    while every pixel still counts."""
    n, c, h, w = shape
    q = integers((n, c, h * w), -2, 2)
    return (integers((n, c, 1), -8, 8) + q - q.roll(1, dims=2)).view(n, c, h, w)


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_add_relu(data):
    draw = data.draw
    shape, dtype, exact, relu = draw_shape(draw), draw(st.sampled_from(DTYPES)), draw(st.booleans()), draw(st.booleans())
    layouts = draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    # Integers up to 100 and their sums are exact in every dtype.
    x, y = (integers(shape, -100, 100) if exact else torch.randn(shape) for _ in range(2))
    x, y = in_layout(x.to(dtype), layouts[0]), in_layout(y.to(dtype), layouts[1])
    with unwritten_reads_nan(x.device):
        out = ops.add_relu(x, y, relu, backend="triton")
    assert out.shape == shape and out.dtype == dtype
    check(out, reference_add_relu(x, y, relu), "elementwise", exact)


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_global_avg_pool(data):
    draw = data.draw
    shape, dtype, exact = draw_shape(draw), draw(st.sampled_from(DTYPES)), draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    x = exact_pooling_input(shape) if exact else torch.randn(shape)
    x = in_layout(x.to(dtype), layout)
    with unwritten_reads_nan(x.device):
        out = ops.global_avg_pool(x, backend="triton")
    assert out.shape == shape[:2] and out.dtype == dtype
    check(out, reference_global_avg_pool(x), "elementwise", exact)


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_gap_linear(data):
    draw = data.draw
    shape, dtype, exact = draw_shape(draw), draw(st.sampled_from(DTYPES)), draw(st.booleans())
    out_features, layout = draw(st.integers(1, 40)), draw(st.sampled_from(LAYOUTS))
    bias_dtype = draw(st.sampled_from([None, torch.float32, "x"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if exact:  # pooled values are integers in [-8, 8], |w| <= 2, C <= 130: |out| <= 2083, exact in float32
        x = exact_pooling_input(shape)
        weight = integers((out_features, shape[1]), -2, 2).to(dtype)
        bias = None if bias_dtype is None else integers((out_features,), -3, 3)
    else:
        x = torch.randn(shape)
        weight, bias = make_head((*shape, out_features), dtype, "cpu", bias_dtype)
    x = in_layout(x.to(dtype), layout)
    bias = None if bias is None else bias.to(dtype if bias_dtype == "x" else bias_dtype)
    with unwritten_reads_nan(x.device):
        out = ops.gap_linear(x, weight, bias, backend="triton")
    assert out.shape == (shape[0], out_features) and out.dtype == dtype
    check(out, reference_gap_linear(x, weight, bias), "conv", exact)
