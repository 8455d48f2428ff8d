"""Fused convolution: out = act(conv2d(x, w) + bias + residual), one Triton kernel.

The algorithm is an implicit GEMM over NHWC memory. With output size P x Q, the convolution is
the matrix product

    out[m, k] = sum_{r, s, c} x[n, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w, c] * w[k, c, r, s]

    with rows m = (n, p, q) in [0, N*P*Q), columns k in [0, K), and reduction index (r, s, c).

The A operand (im2col of x) is never materialized: each program computes the addresses of its
A tile from (n, p, q, r, s, c) and loads it with a mask that zeroes the padding halo. B is the
weight, read through its strides (channels_last weights make the c axis contiguous).

Program ids: a 1-D grid of cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N) programs, each owning one
BLOCK_M x BLOCK_N tile of out. Ids are mapped to tiles in groups of GROUP_M row-tiles, so that
programs that run together share the same few columns of B and rows of A in L2.

Two reduction orders, chosen by the launcher (FLAT_REDUCTION):
- channel-blocked: for each filter tap (r, s), BLOCK_K consecutive channels. Every load of A is
  a contiguous run of channels of one pixel; used when C fills the tiles well.
- flat: the R*S*C reduction indices are taken BLOCK_K at a time in (r, s, c) order. A C=3 stem
  conv (R*S*C = 147 for 7x7) then wastes only the last partial block, where the channel-blocked
  order would leave 13 of every 16 lanes empty.

Split-K, for problems too small to fill the GPU (batch 1 on the deep layers: a 7x7 map has 49
output pixels, one row tile): a second grid axis of SPLIT_K programs per tile, each reducing one
contiguous range of the reduction steps (an even share: split i takes steps [i*T/SPLIT_K,
(i+1)*T/SPLIT_K) of T). Each stores its float32 partial tile in a workspace and
bumps the tile's arrival counter; the last to arrive sums the SPLIT_K partials in split order
(so the result does not depend on which program came last: deterministic), runs the epilogue and
resets the counter to zero for the next launch (the autotuner relaunches with the same counters).
The launcher offers these configs to the autotuner only when the problem has fewer 64x64 tiles
than the GPU has SMs. The call that tunes a problem allocates the workspace and zeroes the counters
(one small fill kernel) for every candidate; later calls launch the chosen config directly, with a
workspace only if that config splits. Before the autotuner times the candidates, the tuning call
compiles them all at once on a thread pool (parallel_compile.py): the autotuner alone would compile
them one after another.

The epilogue adds the bias (the folded BatchNorm shift) and the residual in float32, applies the
ReLU (NaN stays NaN, as in torch.relu), casts, and stores through out's strides, so out may be a
channel slice of a larger tensor. Offsets are int64 where they can pass 2^31: the batch and pixel
terms always (N*H*W*C passes 2^31 on large batches), the channel and filter-tap terms where the
launcher finds they can (WIDE_OFFSETS: a huge image, or a layout whose batch stride is not the
outermost); otherwise those stay 32-bit, which keeps the inner loop's address arithmetic cheap.

conv2d_bias_act, the launcher, runs a float16/bfloat16 layer on a persistent TMA kernel instead
(unpadded 1x1 stride-1 layers: conv2d_pointwise.py; layers with larger filters, stride 1 or a
stride that divides the map, and unpadded strided 1x1 layers: conv2d_spatial.py), where that
kernel takes the layer and was measured faster.
"""
import contextlib
import functools
import warnings

import torch
import triton
import triton.language as tl
import triton.testing

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.ops import conv2d_output_size
from cnnfast.precision import tf32_allowed
from cnnfast.triton_kernels import choice_cache, conv2d_pointwise, conv2d_spatial
from cnnfast.triton_kernels.conv2d_pointwise import grouped_tile, relu_keeping_nan, shared_memory_fits
from cnnfast.triton_kernels.parallel_compile import autotuner_has_choice, check_tuned_if_capturing, compile_in_parallel


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for Hopper. The channel-blocked order: large tiles for
# the compute-bound 3x3 layers, shallow pipelines for 1x1 layers whose reduction is one or two
# blocks long. The flat order decodes (r, s, c) per element, which costs registers: only the tiles
# that compile without spills on sm_90a (tests/test_triton_compile.py checks every one; 128x256
# and 256x128 tiles spill in both orders) under triton 3.8 and under the GPU image's 3.6, where a
# 64x64x64 flat tile needs 8 warps (with 4 it spills 8 to 244 bytes).
CHANNEL_BLOCKED_TILES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 64, 32, 4, 5),
    (64, 256, 32, 8, 4), (64, 32, 64, 4, 5), (128, 64, 64, 4, 2), (64, 64, 64, 4, 2),
]
FLAT_TILES = [(64, 64, 64, 8, 5), (64, 64, 64, 8, 2), (64, 64, 32, 4, 5), (64, 256, 32, 8, 4), (64, 32, 64, 4, 5)]


# Split-K candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K): small tiles, since they
# are offered only for problems with fewer tiles than SMs.
CHANNEL_BLOCKED_SPLIT_TILES = [
    (64, 64, 64, 4, 4, 2), (64, 64, 64, 4, 4, 4), (64, 64, 64, 4, 4, 8), (64, 128, 64, 4, 4, 4), (64, 32, 64, 4, 5, 8),
]
FLAT_SPLIT_TILES = [(64, 64, 64, 8, 5, 2), (64, 64, 64, 8, 5, 4)]

# The tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K) that spill registers on sm_90a in IEEE
# float32 (TF32 off), in either order, under triton 3.6 or 3.8: without tensor cores tl.dot runs as
# FMAs on operands held in registers. The autotuner leaves them out of IEEE float32 layers, which
# keep the 64-row tiles of 32 and 64 columns (tests/test_triton_compile.py compiles those without spills).
IEEE_SPILLING_TILES = {
    (128, 128, 64, 8, 3, 1), (128, 64, 64, 4, 4, 1), (128, 64, 64, 4, 2, 1), (64, 128, 64, 4, 4, 1),
    (128, 64, 32, 4, 5, 1), (64, 256, 32, 8, 4, 1), (64, 64, 64, 4, 4, 4), (64, 64, 64, 4, 4, 8),
    (64, 128, 64, 4, 4, 4),
}


def tile_config(block_m, block_n, block_k, warps, stages, split_k=1, group_m=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m, "SPLIT_K": split_k},
        num_warps=warps, num_stages=stages,
    )


def config_name(config) -> str:
    """A config's short name: tile, group, warps, stages, splits ("128x128x64-g8-w8-s3-split1")."""
    meta = config.kwargs
    return (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}-g{meta['GROUP_M']}-w{config.num_warps}"
            f"-s{config.num_stages}-split{meta['SPLIT_K']}")


def conv2d_configs(flat: bool, interpreted: bool = INTERPRETED):
    """Autotuning candidates for one reduction order: Hopper tiles on a GPU, two small tiles under
    the interpreter."""
    if interpreted:
        return [tile_config(32, 32, 16, 4, 1, group_m=4), tile_config(16, 64, 32, 4, 1, group_m=1)]
    return [tile_config(*tile) for tile in (FLAT_TILES if flat else CHANNEL_BLOCKED_TILES)]


def split_k_configs(flat: bool, interpreted: bool = INTERPRETED):
    """The split-K candidates of one reduction order (the interpreter's: 2 and 3 splits of a small
    tile, 3 so that the steps do not divide evenly)."""
    if interpreted:
        return [tile_config(32, 32, 16, 4, 1, split_k, group_m=4) for split_k in (2, 3)]
    return [tile_config(*tile) for tile in (FLAT_SPLIT_TILES if flat else CHANNEL_BLOCKED_SPLIT_TILES)]


@triton.jit
def bias_residual_act_store(
    acc, offs_n, n, p, q, m_valid, n_valid,
    bias_ptr, res_ptr, out_ptr,
    sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
):
    """The epilogue, in float32: bias, residual, ReLU, then one store through out's strides."""
    out_mask = m_valid[:, None] & n_valid[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_ptrs = (res_ptr + n * sr_n + p.to(tl.int64) * sr_h + q.to(tl.int64) * sr_w)[:, None] + (offs_n * sr_c)[None, :]
        acc += tl.load(res_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = relu_keeping_nan(acc)
    out_ptrs = (out_ptr + n * so_n + p.to(tl.int64) * so_h + q.to(tl.int64) * so_w)[:, None] + (offs_n * so_c)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def conv2d_bias_act_kernel(
    # pointers (partials_ptr, arrivals_ptr: the split-K workspace, unused when SPLIT_K == 1)
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, partials_ptr, arrivals_ptr,
    # sizes
    N, C, H, W, K, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides, in elements, of the logical (N, C, H, W) / (K, C, R, S) tensors
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    FLAT_REDUCTION: tl.constexpr, EVEN_C: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    if WIDE_OFFSETS:  # a channel or filter-tap term can pass 2^31 (wide_offsets): those products in int64
        sx_c, sx_h, sx_w = tl.cast(sx_c, tl.int64), tl.cast(sx_h, tl.int64), tl.cast(sx_w, tl.int64)
        sw_k, sw_c = tl.cast(sw_k, tl.int64), tl.cast(sw_c, tl.int64)
        sw_r, sw_s = tl.cast(sw_r, tl.int64), tl.cast(sw_s, tl.int64)
        sr_c, so_c = tl.cast(sr_c, tl.int64), tl.cast(so_c, tl.int64)
    M = tl.cast(N, tl.int64) * P * Q  # output pixels: 2^31 or more on a large batch of small maps
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M).to(tl.int32)  # below the grid's 2^31 limit; keeps the tile arithmetic 32-bit
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    # Rows of the tile: output pixels (n, p, q).
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    # n scales the batch stride in int64; coordinates inside one image fit int32, which keeps the
    # bounds checks of the inner loop 32-bit.
    n = offs_m // (P * Q)
    pq = (offs_m % (P * Q)).to(tl.int32)
    p = pq // Q
    q = pq % Q
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    x_rows = x_ptr + n * sx_n
    # Columns of the tile: output channels k.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < K
    w_cols = w_ptr + offs_n * sw_k

    # What depends on the row alone is computed once: the address of tap (r, s) = (0, 0) of each
    # output pixel. Every other tap adds an offset that is the same for all rows.
    a_rows = x_rows + ih0.to(tl.int64) * sx_h + iw0.to(tl.int64) * sx_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_REDUCTION:
        RSC = R * S * C
        if SPLIT_K == 1:
            kk_first = 0
            kk_last = RSC
        else:  # this program's share of the whole BLOCK_K blocks, spread evenly over the splits
            blocks = tl.cdiv(RSC, BLOCK_K)
            kk_first = tl.program_id(1) * blocks // SPLIT_K * BLOCK_K
            kk_last = tl.minimum((tl.program_id(1) + 1) * blocks // SPLIT_K * BLOCK_K, RSC)
        for kk0 in range(kk_first, kk_last, BLOCK_K):
            kk = kk0 + tl.arange(0, BLOCK_K)
            k_valid = kk < RSC
            r = kk // (S * C)
            s = (kk // C) % S
            c = kk % C
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_mask = m_valid[:, None] & k_valid[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_offs = (r * dil_h * sx_h + s * dil_w * sx_w + c * sx_c)[None, :]
            a = tl.load(a_rows[:, None] + a_offs, mask=a_mask, other=0.0)
            b_offs = (c * sw_c + r * sw_r + s * sw_s)[:, None]
            b = tl.load(w_cols[None, :] + b_offs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        c_blocks = tl.cdiv(C, BLOCK_K)
        if SPLIT_K == 1:
            step_first = 0
            step_last = R * S * c_blocks
            r = 0
            s = 0
            c0 = 0
        else:  # this program's share of the steps, spread evenly; its first (r, s, c0) decoded once
            step_first = tl.program_id(1) * (R * S * c_blocks) // SPLIT_K
            step_last = (tl.program_id(1) + 1) * (R * S * c_blocks) // SPLIT_K
            c0 = (step_first % c_blocks) * BLOCK_K
            s = (step_first // c_blocks) % S
            r = step_first // (c_blocks * S)
        for _ in range(step_first, step_last):
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_valid = m_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs_c = c0 + offs_k
            a_ptrs = a_rows[:, None] + (r * dil_h * sx_h + s * dil_w * sx_w + offs_c * sx_c)[None, :]
            b_ptrs = w_cols[None, :] + (r * sw_r + s * sw_s + offs_c * sw_c)[:, None]
            if EVEN_C:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_valid[None, :], other=0.0)
            else:
                c_valid = offs_c < C
                a = tl.load(a_ptrs, mask=row_valid[:, None] & c_valid[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_valid[:, None] & n_valid[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            # Step (r, s, c0) in reduction order with compares, not divisions.
            c0 += BLOCK_K
            next_tap = c0 >= C
            c0 = tl.where(next_tap, 0, c0)
            s = tl.where(next_tap, s + 1, s)
            next_row = s >= S
            s = tl.where(next_row, 0, s)
            r = tl.where(next_row, r + 1, r)

    epilogue_args = (offs_n, n, p, q, m_valid, n_valid, bias_ptr, res_ptr, out_ptr,
                     sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w, HAS_BIAS, HAS_RESIDUAL, RELU)
    if SPLIT_K == 1:
        bias_residual_act_store(acc, *epilogue_args)
    else:
        # partials is (SPLIT_K, M, K) float32; the arrival counter of this tile is arrivals[pid].
        partial_ptrs = partials_ptr + offs_m[:, None] * K + offs_n[None, :]
        split_stride = tl.cast(M, tl.int64) * K
        tile_mask = m_valid[:, None] & n_valid[None, :]
        tl.store(partial_ptrs + tl.program_id(1) * split_stride, acc, mask=tile_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()  # no thread reads the partials before the counter said all are written
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(SPLIT_K):  # in split order, whichever program arrived last
                total += tl.load(partial_ptrs + split * split_stride, mask=tile_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + pid, 0, sem="relaxed")  # ready for the next launch
            bias_residual_act_store(total, *epilogue_args)


def pipeline_shared_memory(config, element_size: int) -> int:
    """Bytes of shared memory the software pipeline holds: num_stages A and B tiles."""
    kw = config.kwargs
    return (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size * config.num_stages


def config_fits(config, dtype: torch.dtype, device) -> bool:
    """Whether a config's pipeline fits the device's shared memory (float32 tiles are twice as big)."""
    return shared_memory_fits(pipeline_shared_memory(config, torch.empty((), dtype=dtype).element_size()), device)


def tile_of(config) -> tuple:
    """A config as its tile list's entry: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K)."""
    meta = config.kwargs
    return meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], config.num_warps, config.num_stages, meta["SPLIT_K"]


def precision_keeps(config, dtype: torch.dtype, input_precision: str) -> bool:
    """Whether a config compiles well for these operands: IEEE float32 leaves out the tiles that
    spill. (float16 and bfloat16 operands also pass input_precision "ieee", which tl.dot ignores
    for them: they run on the tensor cores whatever it says.)"""
    return not (dtype == torch.float32 and input_precision == "ieee") or tile_of(config) not in IEEE_SPILLING_TILES


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: the configs that fit the device's shared memory and
    compile without spills in the layer's dot precision."""
    args = {**named_args, **kwargs}  # the autotuner passes the keyword arguments apart
    x = args["x_ptr"]
    return [config for config in configs
            if config_fits(config, x.dtype, x.device) and precision_keeps(config, x.dtype, args["INPUT_PRECISION"])]


# EVEN_C drops the channel mask when every block of channels is full.
conv2d_bias_act_heuristic = triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_K"] == 0})(
    conv2d_bias_act_kernel
)

def candidate_configs(flat: bool, split: bool):
    """A tuner's candidates: the tiles the reduction order compiles well, with or without split-K."""
    return conv2d_configs(flat) + (split_k_configs(flat) if split else [])


def autotuned(flat: bool, split: bool):
    configs = candidate_configs(flat, split)
    return triton.autotune(
        # The interpreter cannot time configs, so it runs the first of its set.
        configs=configs[:1] if INTERPRETED else configs,
        # Everything that changes which tile is fastest (Triton adds every operand's dtype), except
        # the bias and the ReLU, a few instructions of the epilogue: the geometry, padding included
        # (two layers may differ in it alone). As problem_key, which chooses first, it leaves out
        # the operands' layouts.
        key=["N", "C", "H", "W", "K", "P", "Q", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
             "HAS_RESIDUAL", "INPUT_PRECISION"],
        prune_configs_by=None if INTERPRETED else {"early_config_prune": prune_configs},
        # 10 ms warm-up and 40 ms of timing per config: a layer runs in about a millisecond or less.
        do_bench=functools.partial(triton.testing.do_bench, warmup=10, rep=40),
    )(conv2d_bias_act_heuristic)


# The tuners by (device, reduction order, split-K offered), each made at its first use. One per
# device: an autotuner keeps its choice by its key alone, and a tile tuned on one GPU may not fit
# another's shared memory. (The TMA kernels' tuners are one per process: a tile of theirs that does
# not fit another GPU fails its launch there, and tma_kernel_failed leaves the layer to this kernel.)
conv2d_bias_act_autotuned: dict[tuple, triton.runtime.Autotuner] = {}


def autotuner_for(device: torch.device, flat: bool, split: bool) -> triton.runtime.Autotuner:
    key = (device, flat, split)
    if key not in conv2d_bias_act_autotuned:
        conv2d_bias_act_autotuned[key] = autotuned(flat, split)
    return conv2d_bias_act_autotuned[key]


def use_flat_reduction(C: int) -> bool:
    """The flat order for channel counts that leave most of a 16-wide (or wider) block empty."""
    return C < 16 or (C % 16 != 0 and C < 64)


def split_k_helps(M: int, K: int, device: torch.device) -> bool:
    """Whether to offer split-K: the problem has fewer 64x64 output tiles than the GPU has SMs,
    so without it most SMs would idle."""
    if device.type != "cuda":
        return False
    return triton.cdiv(M, 64) * triton.cdiv(K, 64) < torch.cuda.get_device_properties(device).multi_processor_count


def split_k_workspace(configs, M: int, K: int, device: torch.device):
    """(partials, arrivals) for the split-K configs among configs: float32 partial tiles for the
    largest SPLIT_K, and zeroed arrival counters for the most tiles; None when none splits."""
    split = [config.kwargs for config in configs if config.kwargs.get("SPLIT_K", 1) > 1]
    if not split:
        return None
    tiles = max(triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(K, kw["BLOCK_N"]) for kw in split)
    partials = torch.empty((max(kw["SPLIT_K"] for kw in split), M, K), dtype=torch.float32, device=device)
    return partials, torch.zeros(tiles, dtype=torch.int32, device=device)


# The config the autotuner chose for each problem this process has run. Later calls of the problem
# launch it directly: no tuner lookup and, when it does not split K, no split-K workspace (whose
# counter fill is a kernel launch of its own, one per conv in a batch-1 CUDA graph). The key holds
# everything the tuner's key does, so the choice read back is the one the tuner would make.
chosen_configs: dict[tuple, triton.Config] = {}


def wide_offsets(x, weight, residual, out, dilation) -> bool:
    """Whether one of the kernel's 32-bit offset terms can reach 2^31 elements, so that it must
    multiply every stride in int64 (WIDE_OFFSETS): the filter-tap and channel term of x's
    addresses, the weight's two terms, and the channel term of residual's and out's (their batch
    and pixel terms are int64 anyway). A huge image gets there, or a layout whose batch stride is
    not the outermost (a view of a (C, N, H, W) buffer)."""
    k, c, r, s = weight.shape
    _, sx_c, sx_h, sx_w = x.stride()
    sw_k, sw_c, sw_r, sw_s = weight.stride()
    terms = [(r - 1) * dilation[0] * sx_h + (s - 1) * dilation[1] * sx_w + (c - 1) * sx_c,
             (k - 1) * sw_k, (r - 1) * sw_r + (s - 1) * sw_s + (c - 1) * sw_c]
    terms += [(k - 1) * t.stride(1) for t in (residual, out) if t is not None]
    return max(terms) >= 2**31


def dot_precision(x) -> str:
    """tl.dot's input precision: TF32 for float32 where cuDNN would use it (not in the interpreter)."""
    return "tf32" if x.dtype == torch.float32 and not INTERPRETED and tf32_allowed("conv") else "ieee"


def problem_key(x, weight, bias, residual, out_dtype, stride, padding, dilation) -> tuple:
    """chosen_configs' key: device, dot precision, every operand's dtype, sizes and geometry."""
    dtypes = (t.dtype if t is not None else None for t in (x, weight, bias, residual))
    return (x.device, dot_precision(x), *dtypes, out_dtype, *x.shape, *weight.shape, *stride, *padding, *dilation)


# The kernels that run the layers they take on TMA operands, each a module with the same interface
# (applies, launch, autotuned, untimed_config, config_name): 1x1 stride-1 layers as one matrix
# product over pixel rows, the other layers they can address on spatial tiles.
TMA_KERNELS = (conv2d_pointwise, conv2d_spatial)

# Per problem that a TMA kernel takes: (module, its tuned config) when that was measured faster
# than this file's implicit GEMM at its own tuned config (both timed on the problem's first call),
# else None. Where kernels cannot be timed (the interpreter) the TMA kernel always runs. What was
# measured on a GPU is also kept on disk (choice_cache.py) with chosen_configs' entry, and read
# back (recall_choices) by later processes.
tma_choices: dict[tuple, tuple | None] = {}
# The problems whose stored choices this process has looked up.
recalled: set[tuple] = set()
# The problems a TMA kernel failed on in this process: not stored as measured (the failure may be
# this process's own, as running out of memory while tuning).
tma_failed: set[tuple] = set()
# The kernels this process has launched outside a CUDA graph capture, by launch_key. A Triton
# kernel is compiled and its module loaded at its first launch, which CUDA forbids while a stream
# is captured (cuModuleLoadData invalidates the capture): a choice read back from disk
# (recall_choices), or a layer met before with operands that another kernel took, would otherwise
# load its kernel for the first time inside the capture.
launched: set[tuple] = set()


def capturing(x) -> bool:
    """Whether a CUDA graph is being captured on x's device's current stream."""
    if not x.is_cuda:
        return False
    with torch.cuda.device(x.device):
        return torch.cuda.is_current_stream_capturing()


def launch_key(kernel: str, problem, relu, *operands) -> tuple:
    """launched's key: the kernel, the problem, the epilogue, and each operand's strides and 16-byte
    alignment, which pick the kernel (alignment decides whether a TMA kernel takes the layer) and
    Triton's specialization of the compiled one (a stride of 1, multiples of 16, aligned pointers)."""
    layout = tuple(None if t is None else (t.stride(), t.data_ptr() % 16 == 0) for t in operands)
    return kernel, problem, relu, layout


def launch_once_loaded(kernel: str, launch, problem, relu, operands):
    """Runs launch(), unless a CUDA graph is being captured and this process has not launched the
    kernel for these operands yet (its first launch would compile and load it): then raises what to do."""
    key = launch_key(kernel, problem, relu, *operands)
    in_capture = capturing(operands[0])
    if in_capture and key not in launched:
        raise RuntimeError(
            f"conv2d: the Triton kernel for this layer ({kernel}) has not run in this process with these operands, "
            "and no kernel can be compiled or loaded while a CUDA graph is captured; run the model (or the op) once "
            "with these inputs before capturing it"
        )
    result = launch()
    if not in_capture:
        launched.add(key)
    return result


def kernel_module_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def problem_text(problem) -> str:
    """A problem_key as choice_cache stores it: everything but the device."""
    return " ".join(map(str, problem[1:]))


def named_config(configs, name_of, name):
    return next((config for config in configs if name_of(config) == name), None)


def recall_choices(x, problem) -> None:
    """Takes what an earlier process measured for this problem on this GPU (choice_cache), where
    this process has not measured it yet; a config no longer among the candidates is left out."""
    stored = choice_cache.entry(x.device, problem_text(problem))
    if stored is None:
        return
    if "implicit_gemm" in stored and problem not in chosen_configs:
        configs = candidate_configs(flat=False, split=True) + candidate_configs(flat=True, split=True)
        config = named_config(configs, config_name, stored["implicit_gemm"])
        if config is not None:
            chosen_configs[problem] = config
    if "tma" in stored and problem not in tma_choices:
        if stored["tma"] is None:
            tma_choices[problem] = None
            return
        kernel, name = stored["tma"]
        module = next((module for module in TMA_KERNELS if kernel_module_name(module) == kernel), None)
        config = named_config(module.autotuned.configs, module.config_name, name) if module is not None else None
        if config is not None:
            tma_choices[problem] = module, config


def remember_choices(x, problem) -> None:
    """Stores this problem's measured choices for later processes (choice_cache)."""
    stored = {}
    if problem in tma_choices and problem not in tma_failed:
        choice = tma_choices[problem]
        stored["tma"] = None if choice is None else [kernel_module_name(choice[0]), choice[0].config_name(choice[1])]
    if problem in chosen_configs:
        stored["implicit_gemm"] = config_name(chosen_configs[problem])
    choice_cache.store(x.device, problem_text(problem), stored)


def tuned_kernel_name(x, weight, bias, residual, out_dtype, stride, padding, dilation) -> str | None:
    """What a call of this problem with these tensors and a new output (channels_last, as
    cnnfast.ops.conv2d allocates it) runs, once one has run: the TMA kernel's config name
    ("tma-..."), or the implicit GEMM's ("128x128x64-g8-w8-s3-split1"); None before."""
    problem = problem_key(x, weight, bias, residual, out_dtype, stride, padding, dilation)
    if tma_choices.get(problem) is not None:
        module, config = tma_choices[problem]
        # A layout the TMA kernel does not take runs on the implicit GEMM whatever was chosen.
        p, q = conv2d_output_size("conv2d", x.shape, weight.shape, stride, padding, dilation)
        out = torch.empty(x.shape[0], weight.shape[0], p, q, dtype=out_dtype, device="meta")
        if module.applies(x, weight, residual, out.contiguous(memory_format=torch.channels_last), stride, padding,
                          dilation):
            return module.config_name(config)
    config = chosen_configs.get(problem)
    return config_name(config) if config is not None else None


def kernels_can_be_timed() -> bool:
    """Whether kernels run on a GPU here, where they can be timed (not under the interpreter)."""
    return not INTERPRETED


def tma_kernel_failed(module, x, weight, error, problem) -> None:
    """Says that a TMA kernel failed on a layer, which the implicit GEMM runs from now on in this process."""
    warnings.warn(f"cnnfast: the TMA conv kernel {kernel_module_name(module)} failed on {tuple(x.shape)} -> "
                  f"{weight.shape[0]} channels ({type(error).__name__}: {error}); the implicit GEMM runs this layer")
    tma_choices[problem] = None
    tma_failed.add(problem)


def tma_choice(x, weight, bias, residual, out, stride, padding, dilation, relu, problem):
    """(module, config) of the TMA kernel for this layer if one takes the layer and was measured
    faster than the implicit GEMM, else None. The problem's first call tunes both kernels, then
    times each at its tuned config; every run writes out, which cnnfast.ops.conv2d keeps apart from
    the inputs, so each leaves the same result. Where kernels cannot be timed, the TMA kernel runs.
    While a CUDA graph is being captured the TMA kernel is not tuned or timed: a problem not yet
    measured (one that ran before with operands no TMA kernel took: alignment is not in the key)
    runs on the implicit GEMM, and is measured on a later call outside the capture. If
    the TMA kernel fails to tune (it raises: a compile or launch error), a warning says so and the
    implicit GEMM takes the layer."""
    # Checked on every call: alignment and strides, which the problem key leaves out, decide it.
    module = next((module for module in TMA_KERNELS
                   if module.applies(x, weight, residual, out, stride, padding, dilation)), None)
    if module is None:
        return None
    if problem in tma_choices:
        return tma_choices[problem]
    if not kernels_can_be_timed():
        tma_choices[problem] = module, module.untimed_config(x, out, residual is not None)
        return tma_choices[problem]
    if capturing(x):
        return None
    try:
        module.launch(x, weight, bias, residual, out, stride, padding, dilation, relu)  # tunes its tiles
    except Exception as error:  # whatever failed, the implicit GEMM can still run the layer
        tma_kernel_failed(module, x, weight, error, problem)
        return None
    tma_config = module.autotuned.best_config
    implicit_gemm(x, weight, bias, residual, out, stride, padding, dilation, relu)  # tunes and keeps its tile
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        # Both launched as later calls launch them: the tuned config, directly.
        tma_ms = triton.testing.do_bench(
            lambda: module.launch(x, weight, bias, residual, out, stride, padding, dilation, relu, config=tma_config),
            warmup=10, rep=40, return_mode="median")
        implicit_ms = triton.testing.do_bench(
            lambda: implicit_gemm(x, weight, bias, residual, out, stride, padding, dilation, relu), warmup=10, rep=40,
            return_mode="median")
    tma_choices[problem] = (module, tma_config) if tma_ms < implicit_ms else None
    remember_choices(x, problem)
    return tma_choices[problem]


def conv2d_bias_act(x, weight, bias, residual, out, stride, padding, dilation, relu, config=None):
    """Launches the fused convolution. Inputs are already checked (cnnfast.ops.conv2d); `out` is
    allocated, (N, K, P, Q). A float16/bfloat16 layer that a TMA kernel takes (conv2d_pointwise.py:
    unpadded 1x1 stride-1 layers over pixel rows; conv2d_spatial.py: layers with larger filters, at
    stride 1 or one that divides the map, and unpadded strided 1x1 layers) runs on it where it was
    measured faster (tma_choice, or an earlier process: recall_choices), any other on the implicit
    GEMM. On a GPU, a TMA launch that raises (a stored choice that no longer compiles, say) leaves
    a warning and the layer to the implicit GEMM. `config` (a triton.Config of the implicit GEMM)
    runs the implicit GEMM with that config, without autotuning. While a CUDA graph is captured, a
    kernel this process has not yet run on the layer with these operands' strides and alignment is
    refused (launch_once_loaded: it would compile and load in the capture). An output map of 2^31 pixels or
    more (one image), or a padded input 2^31 or more high or wide, is refused: the kernels' pixel
    coordinates within an image are 32-bit."""
    if out.shape[2] * out.shape[3] >= 2**31:
        raise NotImplementedError(f"conv2d: backend 'triton' indexes one image's output pixels in 32 bits; a "
                                  f"{out.shape[2]} x {out.shape[3]} map has 2^31 or more")
    padded = (x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])
    if max(padded) >= 2**31:
        raise NotImplementedError(f"conv2d: backend 'triton' indexes the padded input in 32 bits; padding "
                                  f"{tuple(padding)} makes it {padded[0]} x {padded[1]}, 2^31 or more")
    problem = problem_key(x, weight, bias, residual, out.dtype, stride, padding, dilation)
    operands = (x, weight, bias, residual, out)
    if config is None:
        if kernels_can_be_timed() and problem not in recalled:
            recalled.add(problem)
            recall_choices(x, problem)
        choice = tma_choice(x, weight, bias, residual, out, stride, padding, dilation, relu, problem)
        if choice is not None:
            module, tma_config = choice
            launch = functools.partial(module.launch, x, weight, bias, residual, out, stride, padding, dilation,
                                       relu, config=tma_config)
            try:
                return launch_once_loaded(kernel_module_name(module), launch, problem, relu, operands)
            except Exception as error:  # a choice read from disk compiles and launches here for the first time
                if not kernels_can_be_timed() or capturing(x):  # the interpreter's errors, and a refusal, must show
                    raise
                tma_kernel_failed(module, x, weight, error, problem)
    launch = functools.partial(implicit_gemm, x, weight, bias, residual, out, stride, padding, dilation, relu, config,
                               problem)
    return launch_once_loaded("implicit_gemm", launch, problem, relu, operands)


def implicit_gemm(x, weight, bias, residual, out, stride, padding, dilation, relu, config=None, problem=None):
    """Launches the implicit GEMM (conv2d_bias_act_kernel); `config` bypasses autotuning; `problem`
    is the call's problem_key, where the caller has it."""
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    flat = use_flat_reduction(C)
    precision = dot_precision(x)
    if problem is None:
        problem = problem_key(x, weight, bias, residual, out.dtype, stride, padding, dilation)
    if config is None:
        config = chosen_configs.get(problem)
    if config is None:
        tuner = autotuner_for(x.device, flat, split_k_helps(N * P * Q, K, x.device))
        candidates = tuner.configs
    else:
        candidates = [config]
    workspace = split_k_workspace(candidates, N * P * Q, K, x.device)
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is False
    b = bias.contiguous() if bias is not None else out  # the kernel reads the bias at unit stride
    partials, arrivals = workspace if workspace is not None else (out, out)  # never read when SPLIT_K == 1
    args = (
        x, weight, b, res, out, partials, arrivals,
        N, C, H, W, K, P, Q, R, S,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        # tl.dot on bfloat16 operands is wrong under the interpreter (triton 3.8): upcast there.
        FLAT_REDUCTION=flat, UPCAST_DOT=INTERPRETED, INPUT_PRECISION=precision,
        WIDE_OFFSETS=wide_offsets(x, weight, residual, out, dilation),
    )

    def grid(meta):
        return (triton.cdiv(N * P * Q, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            check_tuned_if_capturing("conv2d", x.device, tuner, args, flags)
            # The tuner would compile its candidates one by one as it times them (unless it already
            # chose for its key, which leaves out bias and ReLU).
            if not INTERPRETED and not autotuner_has_choice(tuner, args, flags):
                kept = prune_configs(candidates, {"x_ptr": x}, **flags)
                compile_in_parallel(conv2d_bias_act_heuristic, kept, args, flags)
            tuner[grid](*args, **flags)
            chosen_configs[problem] = tuner.best_config
            if kernels_can_be_timed():
                remember_choices(x, problem)
        else:
            conv2d_bias_act_heuristic[grid(config.kwargs)](*args, **flags, **config.all_kwargs())
    return out
