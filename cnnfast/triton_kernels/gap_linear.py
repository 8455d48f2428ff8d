"""The classifier head, out[n, o] = bias[o] + sum_c mean_hw(x[n, c, :, :]) * weight[o, c]:
global average pooling, then a matrix product with the bias in its epilogue.

Two kernels, not one. Pooling reads all of x and is bound by bandwidth: it needs every SM
streaming x once, which the global_avg_pool kernel does (one program per image and channel block).
The product pooled (N x C) @ weight^T (C x O) is a small GEMM that wants tensor-core tiles. A
single kernel that pools inside the GEMM's A-operand loop (this module's first design) read x once
per column of output tiles and left all the pooling to a few hundred serial programs: on an H200
(triton 3.6, bf16, 2048 x 7 x 7 -> 1000) it took 0.39 ms at batch 256 and 0.27 ms at batch 1,
against 0.033 ms and 0.025 ms for PyTorch's mean -> linear. The split costs the pooled matrix,
N*C elements: 1 MB at batch 256, 2% of x.

The pooled matrix is rounded to x's dtype, as PyTorch's mean -> linear rounds it, so the product
sees the same A operand.

linear_bias_kernel, program ids: a 1-D grid of cdiv(N, BLOCK_N) * cdiv(O, BLOCK_O) programs, each
owning one BLOCK_N x BLOCK_O tile of out; the BLOCK_O blocks of one row block have consecutive
ids, so the programs running together share their rows of pooled in L2. A program walks C in
BLOCK_C steps, multiplying a [BLOCK_N, BLOCK_C] tile of pooled by a [BLOCK_C, BLOCK_O] tile of
weight^T on the tensor cores with float32 accumulation; the epilogue adds the bias in float32 and
stores in x's dtype. float32 inputs use TF32 where PyTorch's matmuls may (as F.linear does:
torch.backends.cuda.matmul.allow_tf32 or its fp32_precision), IEEE otherwise. Row offsets are int64.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
import triton.testing

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.precision import tf32_allowed
from cnnfast.triton_kernels.global_avg_pool import global_avg_pool, global_avg_pool_configs
from cnnfast.triton_kernels.parallel_compile import check_tuned_if_capturing


def linear_bias_configs(interpreted: bool = INTERPRETED, float32: bool = False):
    """Autotuning candidates for the product: output tile BLOCK_N x BLOCK_O, channel step, warps,
    stages. float32 gets its own, smaller tiles: its IEEE dot runs on the FMA units and holds whole
    operand tiles in registers, so the 64-row tiles spill."""
    if interpreted:
        return [
            triton.Config({"BLOCK_N": 16, "BLOCK_O": 32, "BLOCK_C": 32}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_N": 16, "BLOCK_O": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1),
        ]
    # Small row tiles for the latency-bound batches (1-16 images: a wide grid over O), large ones
    # for batch 256. Every one compiles for sm_90a without spills (tests/test_triton_compile_memory_bound.py).
    tiles = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (32, 64, 64, 4, 4)]
    tiles += [(32, 32, 128, 4, 3)] if float32 else [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_O": block_o, "BLOCK_C": block_c}, num_warps=warps, num_stages=stages)
        for block_n, block_o, block_c, warps, stages in tiles
    ]


@triton.jit
def linear_bias_kernel(
    # pointers
    a_ptr, w_ptr, bias_ptr, out_ptr,
    # sizes
    N, C, O,
    # strides, in elements, of a (N, C), weight (O, C), bias (O,) and out (N, O)
    sa_n, sa_c,
    sw_o, sw_c,
    sb_o,
    so_n, so_o,
    # meta-parameters
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o_blocks = tl.cdiv(O, BLOCK_O)
    offs_n = (tl.program_id(0) // o_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Every index in int64: a product with any stride may pass 2^31 (a transposed weight's sw_c is O).
    offs_o = ((tl.program_id(0) % o_blocks) * BLOCK_O).to(tl.int64) + tl.arange(0, BLOCK_O)
    n_valid = offs_n < N
    o_valid = offs_o < O
    a_rows = a_ptr + offs_n * sa_n
    w_cols = w_ptr + offs_o * sw_o

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = tl.cast(c0, tl.int64) + tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        a = tl.load(a_rows[:, None] + (offs_c * sa_c)[None, :], mask=n_valid[:, None] & c_valid[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (offs_c * sw_c)[:, None], mask=c_valid[:, None] & o_valid[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o * sb_o, mask=o_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + (offs_n * so_n)[:, None] + (offs_o * so_o)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid[:, None] & o_valid[None, :])


def linear_bias_autotuner(float32: bool):
    return triton.autotune(
        # The interpreter cannot time configs, so it runs the first of its set. On a GPU the kernel
        # takes microseconds: 20 ms of timing per config tells them apart (the default spends 125 ms).
        configs=linear_bias_configs(float32=float32)[:1] if INTERPRETED else linear_bias_configs(float32=float32),
        key=["N", "C", "O", "HAS_BIAS", "INPUT_PRECISION"],  # float32's TF32 and IEEE dots differ in speed
        do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
    )(linear_bias_kernel)


# One tuner for float32, one for float16/bfloat16, each with the tiles that compile well for it.
LINEAR_BIAS_AUTOTUNED = {float32: linear_bias_autotuner(float32) for float32 in (False, True)}


def linear_bias(a, weight, bias, config=None):
    """out = a @ weight^T + bias for a (N, C), weight (O, C) in a's dtype (any strides), bias (O,)
    in float32 or a's dtype, or None. Returns a new contiguous (N, O) tensor in a's dtype.
    `config` (a triton.Config of linear_bias_configs) bypasses autotuning."""
    N, C = a.shape
    O = weight.shape[0]
    out = torch.empty((N, O), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    tf32 = a.dtype == torch.float32 and not INTERPRETED and tf32_allowed("matmul")
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    args = (a, weight, b, out, N, C, O, *a.stride(), *weight.stride(), b.stride(0), *out.stride())
    # tl.dot on bfloat16 operands is wrong under the interpreter (triton 3.8): upcast there.
    flags = dict(HAS_BIAS=bias is not None, UPCAST_DOT=INTERPRETED, INPUT_PRECISION="tf32" if tf32 else "ieee")
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(O, meta["BLOCK_O"]),)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        if config is None:
            tuner = LINEAR_BIAS_AUTOTUNED[a.dtype == torch.float32]
            check_tuned_if_capturing("gap_linear", a.device, tuner, args, flags)
            tuner[grid](*args, **flags)
        else:
            linear_bias_kernel[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                    num_stages=config.num_stages)
    return out


def gap_linear(x, weight, bias, config=None):
    """The head on x (N, C, H, W), already checked by cnnfast.ops.gap_linear: weight (O, C) in x's
    dtype, bias (O,) or None. Returns a new contiguous (N, O) tensor in x's dtype. `config` (a
    triton.Config of linear_bias_configs) bypasses autotuning: the product runs it and the pooling
    the first of its own Hopper configs (the interpreter's under the interpreter)."""
    pool_config = None if config is None else global_avg_pool_configs()[0]
    return linear_bias(global_avg_pool(x, config=pool_config), weight, bias, config=config)
