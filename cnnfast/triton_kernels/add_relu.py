"""Residual add with optional ReLU: out = relu?(x + y), one memory-bound Triton kernel; with a
per-channel bias, and y optional, it is also the convolution's epilogue of the torch_triton
backend: out = relu?(conv + bias + residual) in one pass after PyTorch's convolution.

The op reads two tensors and writes one, so its speed is the memory bandwidth it reaches. Two
kernels, chosen by the launcher:

- flat: when x, y and out are all contiguous in one memory format (all channels_last, or all
  NCHW), element i of each sits at the same offset i from its data pointer, so the kernel walks
  numel elements as one 1-D array. Program id p owns elements [p*BLOCK, (p+1)*BLOCK): BLOCK is a
  few thousand elements, so each thread moves several 16-byte vectors and the only index math is
  one add. A storage offset is part of the data pointer and costs nothing.
- strided: any other strides (a channel slice, an expanded batch, an NCHW x beside a
  channels_last y). out is channels_last (cnnfast.ops allocates it so, unless a conv's caller passed
  its own out=), and the kernel walks it in BLOCK_M x BLOCK_C tiles of (pixel, channel): program
  p owns pixel block p // cdiv(C, BLOCK_C), pixels m = (n, h, w), and channel block
  p % cdiv(C, BLOCK_C), so neighbouring programs share pixel rows. (One grid axis: a second one
  stops at 65535 blocks, which a map with millions of channels would pass.) Each pixel's
  (n, h, w) is decoded once per row, not per element, and x and y are read through their own
  strides. A bias, or a missing y, also takes this kernel: a tile's channels are explicit, so
  bias[c] is one load per column.

The sum is taken in float32 and rounded once into out's dtype (as torch.add does for float16 and
bfloat16). out may be x itself: each element is read and written by the same thread (and
autotuning, which runs a kernel many times, then writes into a scratch output). The ReLU is
a select, so NaN passes through as in torch.relu. Offsets are int64: N*C*H*W passes 2^31 for
large batches.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
import triton.testing

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.triton_kernels.conv2d_pointwise import relu_keeping_nan
from cnnfast.triton_kernels.parallel_compile import autotuner_choice, autotuner_has_choice, check_tuned_if_capturing


def add_relu_flat_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates of the flat kernel: elements per program and warps."""
    if interpreted:
        return [triton.Config({"BLOCK": 4096}, num_warps=4), triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]
    ]


def add_relu_strided_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates of the strided kernel: (pixel, channel) tile shape and warps."""
    if interpreted:
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_C": 64}, num_warps=4),
            triton.Config({"BLOCK_M": 16, "BLOCK_C": 8}, num_warps=4),
        ]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=warps)
        for block_m, block_c, warps in [(64, 64, 4), (32, 128, 4), (128, 32, 8), (128, 64, 8), (16, 256, 4)]
    ]


@triton.jit
def add_relu_flat_kernel(
    # pointers
    x_ptr, y_ptr, out_ptr,
    # sizes
    numel,
    # meta-parameters
    RELU: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = tl.load(x_ptr + offs, mask=mask).to(tl.float32) + tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    if RELU:
        v = relu_keeping_nan(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_relu_strided_kernel(
    # pointers (y_ptr and bias_ptr are not read without HAS_Y and HAS_BIAS)
    x_ptr, y_ptr, bias_ptr, out_ptr,
    # sizes
    N, C, H, W,
    # strides, in elements, of the logical (N, C, H, W) tensors
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    so_n, so_c, so_h, so_w,
    s_bias,
    # meta-parameters
    RELU: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid // c_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    pixels = tl.cast(H, tl.int64) * W  # 2^31 or more on an expanded map
    m_valid = offs_m < N * pixels
    n = offs_m // pixels
    h = (offs_m // W) % H
    w = offs_m % W
    offs_c = pid % c_blocks * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    mask = m_valid[:, None] & c_valid[None, :]
    x = tl.load((x_ptr + n * sx_n + h * sx_h + w * sx_w)[:, None] + (offs_c * sx_c)[None, :], mask=mask)
    v = x.to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_c * s_bias, mask=c_valid).to(tl.float32)[None, :]
    if HAS_Y:
        y = tl.load((y_ptr + n * sy_n + h * sy_h + w * sy_w)[:, None] + (offs_c * sy_c)[None, :], mask=mask)
        v += y.to(tl.float32)
    if RELU:
        v = relu_keeping_nan(v)
    out_ptrs = (out_ptr + n * so_n + h * so_h + w * so_w)[:, None] + (offs_c * so_c)[None, :]
    tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)


# The interpreter cannot time configs, so it runs the first of each set. On a GPU the kernels take
# microseconds: 20 ms of timing per config tells them apart (the default spends 125 ms).
add_relu_flat_autotuned = triton.autotune(
    configs=add_relu_flat_configs()[:1] if INTERPRETED else add_relu_flat_configs(), key=["numel"],
    do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
)(add_relu_flat_kernel)
add_relu_strided_autotuned = triton.autotune(
    configs=add_relu_strided_configs()[:1] if INTERPRETED else add_relu_strided_configs(),
    # The channel strides tell the layouts apart (1: channels_last; H*W: NCHW), which move the best tile.
    key=["N", "C", "H", "W", "sx_c", "sy_c", "so_c", "HAS_Y", "HAS_BIAS"],
    do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
)(add_relu_strided_kernel)


def is_flat(x, y, out) -> bool:
    """Whether x, y and out are contiguous in one memory format, so one flat index serves all three."""
    return any(
        all(t.is_contiguous(memory_format=layout) for t in (x, y, out))
        for layout in (torch.contiguous_format, torch.channels_last)
    )


def launch_plan(x, y, out, relu, bias):
    """(kernel, its autotuner, arguments(out) -> the launch arguments, grid, flags) for these operands."""
    if y is not None and bias is None and is_flat(x, y, out):
        arguments = lambda out: (x, y, out, out.numel())
        grid = lambda meta: (triton.cdiv(out.numel(), meta["BLOCK"]),)
        return add_relu_flat_kernel, add_relu_flat_autotuned, arguments, grid, {"RELU": relu}
    N, C, H, W = out.shape
    y_strides = y.stride() if y is not None else (0, 0, 0, 0)
    # An absent operand's pointer is never read: x stands in for it.
    arguments = lambda out: (x, x if y is None else y, x if bias is None else bias, out, N, C, H, W, *x.stride(),
                             *y_strides, *out.stride(), 0 if bias is None else bias.stride(0))
    grid = lambda meta: (triton.cdiv(N * H * W, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_C"]),)
    flags = {"RELU": relu, "HAS_Y": y is not None, "HAS_BIAS": bias is not None}
    return add_relu_strided_kernel, add_relu_strided_autotuned, arguments, grid, flags


def add_relu(x, y, out, relu, config=None, bias=None):
    """Launches out = relu?(x + y + bias). Inputs are already checked (by cnnfast.ops): x, out and y
    (None: no residual) are (N, C, H, W) of one dtype and device; bias (None: none) is (C,),
    float32 or that dtype; out is allocated and is x itself or overlaps none of them.
    `config` (a triton.Config of the kernel that the layouts select) bypasses autotuning."""
    if out.numel() == 0:
        return out
    kernel, autotuned, arguments, grid, flags = launch_plan(x, y, out, relu, bias)
    args = arguments(out)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            check_tuned_if_capturing("add_relu", x.device, autotuned, args, flags)
            if (out.data_ptr() == x.data_ptr() and len(autotuned.configs) > 1
                    and not autotuner_has_choice(autotuned, args, flags)):
                # Tuning times each config by running it many times: in place, every run would add
                # the bias and residual again. So the choice is made writing into a scratch output
                # (same strides, so the same compiled kernels), and the launch below then finds it.
                autotuned[grid](*arguments(torch.empty_like(out)), **flags)
            autotuned[grid](*args, **flags)
        else:
            kernel[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                        num_stages=config.num_stages)
    return out


def tuned_config_name(x, y, out, relu, bias=None) -> str | None:
    """The kernel and config the tuner chose for these operands ("strided-64x64-w4",
    "flat-4096-w8") once a launch of them has run; None before (or for an empty output)."""
    if not out.numel():
        return None
    kernel, autotuned, arguments, _, flags = launch_plan(x, y, out, relu, bias)
    # A tuner with one candidate (the interpreter's) runs it without timing or caching a choice.
    config = autotuned.configs[0] if len(autotuned.configs) == 1 else autotuner_choice(autotuned, arguments(out), flags)
    if config is None:
        return None
    tile = "x".join(str(config.kwargs[name]) for name in ("BLOCK", "BLOCK_M", "BLOCK_C") if name in config.kwargs)
    return f"{'flat' if kernel is add_relu_flat_kernel else 'strided'}-{tile}-w{config.num_warps}"
