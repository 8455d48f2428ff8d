"""Global average pooling fused with the final linear layer, one Triton kernel:

    out[n, o] = bias[o] + sum_c mean_hw(x[n, c, :, :]) * weight[o, c]

It is a matrix product pooled(N x C) @ weight^T (C x O) whose A operand is computed on the fly
from x: pooled (N, C) never goes to memory and the head is one launch instead of two.

Program ids: a 1-D grid of cdiv(N, BLOCK_N) * cdiv(O, BLOCK_O) programs, each owning one
BLOCK_N x BLOCK_O tile of out; the BLOCK_O-blocks of one row block have consecutive ids. A
program loops over C in blocks of BLOCK_C: it sums a [BLOCK_N, BLOCK_HW, BLOCK_C] tile of x over
the pixel axis, BLOCK_HW pixels at a time, in float32; divides by H*W; rounds the pooled
[BLOCK_N, BLOCK_C] tile to x's dtype (the dtype of the matrix product, as in PyTorch's
mean -> linear); and multiplies it with the [BLOCK_C, BLOCK_O] tile of weight^T on the tensor
cores, accumulating in float32. The epilogue adds the bias in float32 and stores in x's dtype.

The cost of fusing: every program that shares a row block pools the same rows of x, so x is
read cdiv(O, BLOCK_O) times and weight cdiv(N, BLOCK_N) times. The programs of one row block
have consecutive ids and run at the same time, so the repeated reads mostly hit L2 (16 images of
2048 x 7 x 7 bf16 are 3.2 MB; the 50 MB L2 holds several row blocks and the whole weight). What
this does not fix is parallelism: for the real heads (N <= 256, C = 512..2048, 7x7 maps,
O = 1000) the grid has at most a few hundred programs, each a serial, latency-bound loop over
all C*H*W. Measured on an H200 (triton 3.6, bf16, 2048 x 7 x 7 -> 1000): 0.39 ms at batch 256
and 0.27 ms at batch 1, against 0.033 ms and 0.025 ms for PyTorch's mean -> linear. The design
that should win splits C across programs, so that x is read once by all SMs, and sums the
partial products of each output tile in a fixed order (deterministic) in the last program to
finish it; this kernel is the simple, tested baseline for it.

float32 inputs use TF32 when torch.backends.cuda.matmul.allow_tf32 is set (as F.linear does),
IEEE otherwise. Offsets into x are int64: N*C*H*W passes 2^31 on large batches.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
import triton.testing

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED


def gap_linear_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates: output tile BLOCK_N x BLOCK_O, channel block, pixel block, warps."""
    if interpreted:
        return [
            triton.Config({"BLOCK_N": 16, "BLOCK_O": 128, "BLOCK_C": 64, "BLOCK_HW": 16}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_N": 16, "BLOCK_O": 16, "BLOCK_C": 16, "BLOCK_HW": 4}, num_warps=4, num_stages=1),
        ]
    # Every one compiles for sm_90a without spills (tests/test_triton_compile_memory_bound.py);
    # a 32x256x32 tile, tried too, spills in bfloat16.
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_O": block_o, "BLOCK_C": block_c, "BLOCK_HW": block_hw},
                      num_warps=warps, num_stages=2)
        for block_n, block_o, block_c, block_hw, warps in [
            (16, 64, 32, 16, 4), (16, 128, 64, 16, 8), (16, 256, 32, 16, 8), (32, 128, 32, 16, 8),
            (64, 128, 32, 8, 8), (16, 32, 64, 8, 4),
        ]
    ]


@triton.jit
def gap_linear_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, out_ptr,
    # sizes
    N, C, H, W, O,
    # strides, in elements, of x (N, C, H, W), weight (O, C), bias (O,) and out (N, O)
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c,
    sb_o,
    so_n, so_o,
    # meta-parameters
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    o_blocks = tl.cdiv(O, BLOCK_O)
    offs_n = (tl.program_id(0) // o_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = (tl.program_id(0) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    n_valid = offs_n < N
    o_valid = offs_o < O
    x_rows = x_ptr + offs_n * sx_n

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        # A operand: the [BLOCK_N, BLOCK_C] tile of pooled x.
        x_tile = x_rows[:, None, None] + (offs_c.to(tl.int64) * sx_c)[None, None, :]
        sums = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for hw0 in range(0, H * W, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            pixel_offs = (hw // W).to(tl.int64) * sx_h + (hw % W).to(tl.int64) * sx_w
            mask = n_valid[:, None, None] & (hw < H * W)[None, :, None] & c_valid[None, None, :]
            pixels = tl.load(x_tile + pixel_offs[None, :, None], mask=mask, other=0.0)
            sums += tl.sum(pixels.to(tl.float32), axis=1)
        a = (sums / (H * W)).to(x_ptr.dtype.element_ty)
        # B operand: the [BLOCK_C, BLOCK_O] tile of weight^T.
        b_ptrs = w_ptr + (offs_c * sw_c)[:, None] + (offs_o * sw_o)[None, :]
        b = tl.load(b_ptrs, mask=c_valid[:, None] & o_valid[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o * sb_o, mask=o_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + (offs_n * so_n)[:, None] + (offs_o * so_o)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid[:, None] & o_valid[None, :])


gap_linear_autotuned = triton.autotune(
    # The interpreter cannot time configs, so it runs the first of its set. On a GPU the kernel
    # takes microseconds: 20 ms of timing per config tells them apart (the default spends 125 ms).
    configs=gap_linear_configs()[:1] if INTERPRETED else gap_linear_configs(),
    key=["N", "C", "H", "W", "O", "HAS_BIAS"],
    do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
)(gap_linear_kernel)


def gap_linear(x, weight, bias, config=None):
    """Launches the fused head. Inputs are already checked (cnnfast.ops.gap_linear): x (N, C, H, W),
    weight (O, C) in x's dtype, bias (O,) or None. Returns a new contiguous (N, O) tensor in x's
    dtype. `config` (a triton.Config) bypasses autotuning."""
    N, C, H, W = x.shape
    O = weight.shape[0]
    out = torch.empty((N, O), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    args = (
        x, weight, b, out,
        N, C, H, W, O,
        *x.stride(), *weight.stride(), b.stride(0), *out.stride(),
    )
    # tl.dot on bfloat16 operands is wrong under the interpreter (triton 3.8): upcast there.
    flags = dict(HAS_BIAS=bias is not None, UPCAST_DOT=INTERPRETED, INPUT_PRECISION="tf32" if tf32 else "ieee")
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(O, meta["BLOCK_O"]),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            gap_linear_autotuned[grid](*args, **flags)
        else:
            gap_linear_kernel[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
    return out
