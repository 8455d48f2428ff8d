"""Fused pointwise convolution: out = act(conv2d(x, w) + bias + residual) for a 1x1, stride-1,
unpadded float16/bfloat16 layer, one persistent Triton kernel whose operands move by TMA.

Over NHWC memory such a layer is a plain matrix product. x's channels_last memory is the row-major
(M, C) matrix of its pixels, M = N*H*W, and a 1x1 weight is the row-major (K, C) matrix, so

    out[m, k] = sum_c x[m, c] * w[k, c]        (out is the (M, K) matrix of output pixels)

ResNet's reduce and expand layers, its 1x1 downsample convs without stride and GoogLeNet's 1x1
branches are all of this kind. Their reduction is short (C = 64 to 2048: one to 32 steps of 64) and
most of them are bound by memory, so what the general implicit GEMM (conv2d.py) spends on each
step -- per-row address arithmetic and masks for the padding halo that a 1x1 filter never has --
and on each tile -- the epilogue, which the next tile's loads cannot overlap -- is a large part
of their time. Here:

- the operands are described by tensor descriptors, and the Hopper copy engine (TMA) fetches each
  [BLOCK_M, BLOCK_K] tile of x and [BLOCK_N, BLOCK_K] tile of w into shared memory: no address
  arithmetic and no masks in the main loop (the engine fills rows and columns past the edges with
  zeros, and clips the stores);
- the grid is persistent: as many programs as SMs, program p taking output tiles p, p + NUM_SMS,
  p + 2*NUM_SMS, ... in GROUP_M-grouped order (the programs running together share a few column
  tiles of w and row tiles of x in L2), and the tile loop and the reduction loop are flattened
  into one loop that Triton software-pipelines across tiles, so the next tile's loads can be in
  flight during this tile's epilogue;
- the epilogue adds the bias and the residual (read by TMA too) in float32, applies the
  ReLU (a select: NaN stays NaN, as in torch.relu), rounds once and stores through out's
  descriptor, whose row pitch may exceed K: out may be a channel slice of a wider channels_last
  tensor, as Inception's branches write.

TMA needs every row pitch and base address on a 16-byte boundary and int32 coordinates:
`applies` says whether a layer meets that, and conv2d.conv2d_bias_act runs the other layers (and
these too, where it measured them faster) on the implicit GEMM.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.layout import pixel_rows
from cnnfast.triton_kernels.parallel_compile import autotuner_has_choice, compile_in_parallel

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for Hopper: 64-wide columns for the K = 64 layers, up to
# 256-wide ones for the K = 1024-2048 expand layers.
HOPPER_TILES = [
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 5),
]


def set_block_shapes(meta):
    """Autotuner pre-hook: each config loads tiles of its own shape, so the descriptors' block shapes
    follow the config being launched."""
    block_m, block_n, block_k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    meta["x_desc"].block_shape = [block_m, block_k]
    meta["w_desc"].block_shape = [block_n, block_k]
    meta["out_desc"].block_shape = [block_m, block_n]
    meta["res_desc"].block_shape = [block_m, block_n]


def conv2d_pointwise_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates: Hopper tiles on a GPU, one small tile under the interpreter."""
    tiles = [(32, 32, 16, 4, 1)] if interpreted else HOPPER_TILES
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                      num_warps=warps, num_stages=stages, pre_hook=set_block_shapes)
        for block_m, block_n, block_k, warps, stages in tiles
    ]


def config_name(config) -> str:
    """A config's short name: "tma-", tile, group, warps, stages ("tma-128x128x64-g8-w8-s4")."""
    meta = config.kwargs
    return (f"tma-{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}-g{meta['GROUP_M']}-w{config.num_warps}"
            f"-s{config.num_stages}")


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a persistent program's tile index, in GROUP_M-grouped order: the
    tiles in flight together share a few column tiles of w and row tiles of x in L2."""
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % pids_per_group) % group_size_m, (tile % pids_per_group) // group_size_m


@triton.jit
def add_bias(acc, bias_ptr, off_n, K, BLOCK_N: tl.constexpr):
    """acc + the bias of its columns off_n ... off_n + BLOCK_N - 1 (those past K add nothing), in float32."""
    offs_n = off_n + tl.arange(0, BLOCK_N)
    return acc + tl.load(bias_ptr + offs_n, mask=offs_n < K, other=0.0).to(tl.float32)[None, :]


@triton.jit
def relu_keeping_nan(acc):
    """ReLU as torch.relu computes it: NaN < 0 is false, so NaN passes through (tl.maximum would give 0)."""
    return tl.where(acc < 0, 0.0, acc)


@triton.jit
def conv2d_pointwise_kernel(
    # tensor descriptors: x as (M, C), w as (K, C), out and residual as (M, K)
    x_desc, w_desc, res_desc, out_desc,
    # pointers
    bias_ptr,
    # sizes
    M, K, C,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, UPCAST_DOT: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    steps = tl.cdiv(C, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(steps):
            a = x_desc.load([off_m, step * BLOCK_K])
            b = w_desc.load([off_n, step * BLOCK_K])
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, off_n, K, BLOCK_N)
        if HAS_RESIDUAL:
            acc += res_desc.load([off_m, off_n]).to(tl.float32)
        if RELU:
            acc = relu_keeping_nan(acc)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


def shared_memory(config, element_size: int, has_residual: bool) -> int:
    """Bytes of shared memory a config holds: num_stages x and w tiles, the output tile staged for
    its TMA store and, with a residual, the residual tile, plus 2 KB for barriers and scratch (the
    compiled kernels take up to about 1 KB more than the tiles)."""
    kw = config.kwargs
    pipeline = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * config.num_stages
    return (pipeline + kw["BLOCK_M"] * kw["BLOCK_N"] * (2 if has_residual else 1)) * element_size + 2048


def shared_memory_fits(size: int, device) -> bool:
    """Whether `size` bytes of shared memory fit one block on the device."""
    return size <= torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def fits(config, x, has_residual: bool) -> bool:
    """Whether config's shared memory fits x's device (a 128x256 tile with a residual does not)."""
    return shared_memory_fits(shared_memory(config, x.element_size(), has_residual), x.device)


def prune_configs(configs, named_args, **kwargs):
    """The configs that fit the device (the autotuner's early_config_prune)."""
    named_args = {**named_args, **kwargs}  # the autotuner passes the keyword arguments apart
    return [config for config in configs if fits(config, named_args["x_desc"].base, named_args["HAS_RESIDUAL"])]


def untimed_config(x, out, has_residual: bool):
    """The config to run where kernels cannot be timed: the interpreter's one, or on a GPU the first
    Hopper config that fits (out: unused, as conv2d_spatial.untimed_config takes it)."""
    configs = conv2d_pointwise_configs()
    return configs[0] if INTERPRETED else next(config for config in configs if fits(config, x, has_residual))


autotuned = triton.autotune(
    # The interpreter cannot time configs, so it runs the first of its set.
    configs=conv2d_pointwise_configs()[:1] if INTERPRETED else conv2d_pointwise_configs(),
    # The descriptors carry no dtype the tuner sees (the bias does): a float16 and a bfloat16 layer
    # with a float32 bias share a choice, rightly, since both move 2-byte elements at the same rate.
    key=["M", "K", "C", "HAS_RESIDUAL"],
    prune_configs_by=None if INTERPRETED else {"early_config_prune": prune_configs},
    do_bench=functools.partial(triton.testing.do_bench, warmup=10, rep=40),
)(conv2d_pointwise_kernel)


def applies(x, weight, residual, out, stride, padding, dilation) -> bool:
    """Whether this kernel takes the layer: 1x1 (any dilation: one tap), stride 1, no padding,
    float16/bfloat16, at least one pixel, and x, weight, residual and out all pixel rows that TMA
    can address (int32 coordinates, 16-byte pitches and bases: C and K multiples of 8)."""
    K, C, R, S = weight.shape
    if (R, S) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or C % 8 or K % 8:
        return False
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if pixels == 0 or pixels + 256 >= 2**31:  # nothing to compute; tile coordinates are int32
        return False
    dense_weight = weight.stride()[:2] == (C, 1) and weight.data_ptr() % 16 == 0
    pixel_tensors = (x, out) + ((residual,) if residual is not None else ())
    return dense_weight and all(pixel_rows(t) is not None for t in pixel_tensors)


def launch(x, weight, bias, residual, out, stride, padding, dilation, relu: bool, config=None):
    """Launches the kernel for a layer `applies` accepts (inputs checked by cnnfast.ops.conv2d; out
    allocated, (N, K, H, W); stride, padding and dilation, which such a layer does not use, are
    taken as conv2d_spatial.launch takes them). `config` (a triton.Config) bypasses autotuning."""
    K, C = weight.shape[:2]
    M, x_pitch = pixel_rows(x)
    _, out_pitch = pixel_rows(out)
    # Placeholder block shapes: the config's pre-hook sets the ones it launches with.
    x_desc = TensorDescriptor(x, [M, C], [x_pitch, 1], [16, 16])
    w_desc = TensorDescriptor(weight, [K, C], [C, 1], [16, 16])
    out_desc = TensorDescriptor(out, [M, K], [out_pitch, 1], [16, 16])
    res_desc = out_desc
    if residual is not None:
        res_desc = TensorDescriptor(residual, [M, K], [pixel_rows(residual)[1], 1], [16, 16])
    num_sms = multiprocessors(x)

    def grid(meta):
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"])),)

    def candidates():
        return [config for config in autotuned.configs if fits(config, x, residual is not None)]

    run_persistent(conv2d_pointwise_kernel, autotuned, candidates, (x_desc, w_desc, res_desc, out_desc), (M, K, C),
                   x, bias, residual, out, relu, grid, config)
    return out


def multiprocessors(x) -> int:
    """The persistent grid's size: the GPU's SM count (4 programs under the interpreter)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4


def run_persistent(kernel_fn, tuner, candidates, descriptors, sizes, x, bias, residual, out, relu, grid, config):
    """Launches a persistent TMA conv kernel (this file's or conv2d_spatial.py's, which share their
    arguments' order: the descriptors of x, w, residual and out, the bias, the sizes, then the
    epilogue flags and NUM_SMS): through its tuner, after compiling candidates() at once on a
    thread pool (the tuner would compile them one after another as it times them), or with
    `config`, whose pre-hook sets the descriptors' block shapes as the tuner's launches do."""
    # The kernel reads the bias at unit stride; out stands in for a missing one (never read).
    args = (*descriptors, bias.contiguous() if bias is not None else out, *sizes)
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
                 # tl.dot on bfloat16 operands is wrong under the interpreter (triton 3.8): upcast there.
                 UPCAST_DOT=INTERPRETED, NUM_SMS=multiprocessors(x))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is None:
            if not INTERPRETED and not autotuner_has_choice(tuner, args, flags):
                compile_in_parallel(kernel_fn, candidates(), args, flags)
            tuner[grid](*args, **flags)
        else:
            names = ("x_desc", "w_desc", "res_desc", "out_desc")
            config.pre_hook({**config.kwargs, **dict(zip(names, descriptors))})
            kernel_fn[grid(config.kwargs)](*args, **flags, **config.all_kwargs())
