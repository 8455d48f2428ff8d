"""Global average pooling: out[n, c] = mean over (h, w) of x[n, c, h, w], one Triton kernel.

The op reads x once and writes N*C values, so it is bound by memory bandwidth. Program ids: a
1-D grid of N * cdiv(C, BLOCK_C) programs; program p owns image n = p // cdiv(C, BLOCK_C) and
the BLOCK_C channels of block p % cdiv(C, BLOCK_C). It walks the H*W pixels BLOCK_HW at a time,
loading a [BLOCK_HW, BLOCK_C] tile per step (with channels_last x, each row of the tile is a
contiguous run of channels), and adds it into a float32 tile of partial sums. At the end the
pixel axis is summed, divided by H*W and stored once in x's dtype.

x is read through its strides, so NCHW, sliced and expanded inputs need no copy. NaN and Inf
propagate through the sum as in torch.mean. Offsets are int64: N*C*H*W passes 2^31 on large
batches; so is the pixel count H*W, which passes it on an expanded map.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
import triton.testing

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.triton_kernels.parallel_compile import check_tuned_if_capturing


def global_avg_pool_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates: (pixels, channels) tile shape and warps."""
    if interpreted:
        return [
            triton.Config({"BLOCK_HW": 16, "BLOCK_C": 64}, num_warps=4),
            triton.Config({"BLOCK_HW": 4, "BLOCK_C": 16}, num_warps=4),
        ]
    return [
        triton.Config({"BLOCK_HW": block_hw, "BLOCK_C": block_c}, num_warps=warps)
        for block_hw, block_c, warps in [(16, 64, 4), (32, 64, 4), (8, 128, 4), (16, 128, 8), (32, 32, 4), (64, 32, 8)]
    ]


@triton.jit
def global_avg_pool_kernel(
    # pointers
    x_ptr, out_ptr,
    # sizes
    N, C, H, W,
    # strides, in elements, of the logical (N, C, H, W) input and (N, C) output
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c,
    # meta-parameters
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // c_blocks).to(tl.int64)
    offs_c = (tl.program_id(0) % c_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = offs_c < C
    x_image = x_ptr + n * sx_n + offs_c * sx_c

    # An expanded map (stride 0) can have 2^31 pixels or more without as many bytes: count in int64.
    pixels = tl.cast(H, tl.int64) * W
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for hw0 in range(0, pixels, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        pixel_offs = (hw // W) * sx_h + (hw % W) * sx_w
        mask = (hw < pixels)[:, None] & c_valid[None, :]
        acc += tl.load(x_image[None, :] + pixel_offs[:, None], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / pixels
    tl.store(out_ptr + n * so_n + offs_c * so_c, mean.to(out_ptr.dtype.element_ty), mask=c_valid)


global_avg_pool_autotuned = triton.autotune(
    # The interpreter cannot time configs, so it runs the first of its set. On a GPU the kernel
    # takes microseconds: 20 ms of timing per config tells them apart (the default spends 125 ms).
    configs=global_avg_pool_configs()[:1] if INTERPRETED else global_avg_pool_configs(),
    key=["N", "C", "H", "W"],
    do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
)(global_avg_pool_kernel)


def global_avg_pool(x, config=None):
    """Pools x (N, C, H, W), already checked by cnnfast.ops.global_avg_pool, into a new contiguous
    (N, C) tensor in x's dtype. `config` (a triton.Config) bypasses autotuning."""
    N, C, H, W = x.shape
    out = torch.empty((N, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    args = (x, out, N, C, H, W, *x.stride(), *out.stride())
    grid = lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            check_tuned_if_capturing("global_avg_pool", x.device, global_avg_pool_autotuned, args, {})
            global_avg_pool_autotuned[grid](*args)
        else:
            global_avg_pool_kernel[grid(config.kwargs)](*args, **config.kwargs, num_warps=config.num_warps,
                                                        num_stages=config.num_stages)
    return out
