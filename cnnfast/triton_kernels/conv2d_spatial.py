"""Fused convolution on spatial tiles: out = act(conv2d(x, w) + bias + residual) for a
float16/bfloat16 layer with a filter larger than 1x1 (any padding and dilation; stride 1, or a
stride that divides the map, as ResNet's stride-2 3x3 layers), one persistent Triton kernel whose
operands move by TMA, the padding halo filled in by the copy engine. A 1x1 unpadded layer with a
stride (ResNet's downsample convs) is a stride-1 1x1 layer over the pixels it reads, x[:, :,
::stride_h, ::stride_w], a view whose descriptor simply has larger pixel strides: it runs here too.

The implicit GEMM (conv2d.py) takes the rows of its A tile, the output pixels, in flat (n, p, q)
order, so a tile's pixels can span the end of one output row and the start of the next, and each
reduction step computes every row's input address and a mask for the padding halo. With stride 1
(strides below) there is another way: take the tile's pixels as a spatial block, BLOCK_IMG images
x BLOCK_H output rows x BLOCK_W output columns starting at (n0, p0, q0). For the filter tap (r,
s), the inputs those pixels read are then themselves one block of x,

    x[n0 : n0 + BLOCK_IMG, p0 - pad_h + r*dil_h : ... + BLOCK_H, q0 - pad_w + s*dil_w : ... + BLOCK_W, c0 : c0 + BLOCK_K]

and a 4-D tensor descriptor of x, (N, H, W, C) over NHWC memory, fetches it with one TMA copy. The
copy engine fills whatever lies outside x -- the padding halo, negative coordinates included, rows
past the last image, channels past C -- with zeros, so the main loop has no address arithmetic and
no masks: per step, one TMA load of that block, one of the weight's [BLOCK_N, 1, 1, BLOCK_K]
block at tap (r, s) (the weight is (K, R, S, C) in channels_last memory), and one wgmma. The x
block becomes the [BLOCK_M, BLOCK_K] A operand (BLOCK_M = BLOCK_IMG*BLOCK_H*BLOCK_W) by merging its
spatial dimensions; Triton does that in registers, from which wgmma takes A (the weight's block
is reshaped in shared memory, where wgmma reads B).

    out[(n, p, q), k] = sum over (r, s, c) of x[n, p - pad_h + r*dil_h, q - pad_w + s*dil_w, c] * w[k, r, s, c]

The reduction runs tap by tap, BLOCK_K channels at a time: R*S*cdiv(C, BLOCK_K) steps.

With a stride, the pixels a tile reads for one tap are every stride-th row and column of a block
of x, which one box of a plain (N, H, W, C) tensor map cannot fetch. So x is described by a 5-D
tensor map, (N, H / stride_h, stride_h, W / stride_w, stride_w * C): each row index h becomes a
position h // stride_h and a phase h % stride_h, and each column likewise, the column's phase
merged with its channels (a row's pixels lie one after another, so phase pw's channels are the
elements pw*C .. pw*C + C - 1 of a run of stride_w*C). The input row of output row p at tap r is
p*stride_h + r*dil_h - pad_h, whose phase is the same for every p; so a tap reads, for a tile,
one box: positions p0 + shift .. (shift = (r*dil_h - pad_h) // stride_h, rounded down), at one
phase, likewise in columns, BLOCK_K channels from phase*C + c0. Positions outside the map are
zero-filled as before. This needs H and W multiples of the stride (else the last position's
phases would run past the map into the next image) and, with a column stride, C a multiple of
BLOCK_K (a box past C would read the next phase's channels instead of zeros); with stride 1 the
map is (N, H, 1, W, C), the same reads as a 4-D one.

Tiles and programs: the output is cut into spatial tiles (BLOCK_IMG x BLOCK_H x BLOCK_W pixels, in
(image block, row block, column block) order) times column tiles of BLOCK_N channels. The grid is
persistent, as in conv2d_pointwise.py: one program per SM, program i taking tiles i, i + NUM_SMS,
... in GROUP_M-grouped order, the tile loop and the reduction loop flattened into one loop that
Triton software-pipelines across tiles. The epilogue adds the bias and the residual (read by TMA
as the same spatial block) in float32, applies the ReLU (NaN stays NaN), rounds once and stores
through out's 4-D descriptor, which clips the pixels of a tile that lie past the map's edge; out
may be a channel slice of a wider channels_last tensor (Inception's 3x3 branches).

The price of spatial tiles is the pixels they waste where the map is not a multiple of the tile
(a 14x14 map in 8x16 tiles computes 256 pixels for 196). Tiles of several proportions, down to
single pixels of many images, are offered, each layer getting the few that waste least on it, and
conv2d.conv2d_bias_act times this kernel against the implicit GEMM per layer and keeps the faster.
TMA needs 16-byte aligned bases and pitches (C and K multiples of 8) and int32 coordinates:
`applies` checks a layer for all of it.
"""
import functools

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from cnnfast.backends import TRITON_INTERPRETED as INTERPRETED
from cnnfast.layout import pixel_grid
from cnnfast.triton_kernels import conv2d_pointwise
from cnnfast.triton_kernels.conv2d_pointwise import add_bias, grouped_tile, relu_keeping_nan

# Spatial tile shapes (BLOCK_IMG, BLOCK_H, BLOCK_W) of 128 and of 64 pixels, in order of how many
# input pixels a 3x3 filter reads per output pixel ((BLOCK_H + 2) * (BLOCK_W + 2) / (BLOCK_H *
# BLOCK_W): 1.4 for 8x16, 9 for single pixels), least first. Shapes whose sizes divide the
# architectures' maps waste nothing: 8x8 for 56x56, 4x4 for 28x28, 2x2 for 14x14, single pixels of
# 128 or 64 images for 7x7 at a batch that is a multiple of it; the others read longer runs and
# reuse more of the halo for a few wasted columns. A layer is offered, of each size, the first
# MAX_SHAPES shapes in this order that waste nearly as little as the best one (least_wasteful).
SPATIAL_SHAPES = {
    128: [(1, 8, 16), (2, 8, 8), (1, 4, 32), (4, 2, 16), (8, 4, 4), (16, 1, 8), (32, 2, 2), (128, 1, 1)],
    64: [(1, 8, 8), (1, 4, 16), (2, 2, 16), (4, 4, 4), (8, 1, 8), (16, 2, 2), (64, 1, 1)],
}
# (BLOCK_N, BLOCK_K, warps, stages) for each BLOCK_M, on Hopper.
COLUMN_TILES = {128: [(128, 64, 8, 4), (256, 64, 8, 3), (64, 64, 4, 4)], 64: [(128, 64, 4, 4), (64, 64, 4, 5)]}
# A shape is offered when it covers at least this share of what the best shape of its size covers;
# at most MAX_SHAPES shapes of a size are, each with every column tile.
COVERAGE_SLACK = 0.97
MAX_SHAPES = 2


def set_block_shapes(meta):
    """Autotuner pre-hook: the descriptors' block shapes follow the config being launched."""
    pixels = [meta["BLOCK_IMG"], meta["BLOCK_H"], meta["BLOCK_W"]]
    meta["x_desc"].block_shape = [meta["BLOCK_IMG"], meta["BLOCK_H"], 1, meta["BLOCK_W"], meta["BLOCK_K"]]
    meta["w_desc"].block_shape = [meta["BLOCK_N"], 1, 1, meta["BLOCK_K"]]
    meta["out_desc"].block_shape = pixels + [meta["BLOCK_N"]]
    meta["res_desc"].block_shape = pixels + [meta["BLOCK_N"]]


def spatial_config(img, block_h, block_w, block_n, block_k, warps, stages):
    return triton.Config(
        {"BLOCK_IMG": img, "BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_M": img * block_h * block_w,
         "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=warps, num_stages=stages, pre_hook=set_block_shapes)


def conv2d_spatial_configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates: every Hopper shape with every column tile of its size on a GPU; under
    the interpreter one small tile (two images of 4x8 pixels, so that its tests cross image, row
    and column edges, and a swap of rows and columns shows)."""
    if interpreted:
        return [spatial_config(2, 4, 8, 16, 16, 4, 1)]
    return [spatial_config(*shape, *tile) for block_m, shapes in SPATIAL_SHAPES.items()
            for shape in shapes for tile in COLUMN_TILES[block_m]]


def config_name(config) -> str:
    """A config's short name: "tma-", spatial tile (images x rows x columns), then columns and
    channels, group, warps, stages ("tma-2x8x8-128x64-g8-w8-s4")."""
    meta = config.kwargs
    return (f"tma-{meta['BLOCK_IMG']}x{meta['BLOCK_H']}x{meta['BLOCK_W']}-{meta['BLOCK_N']}x{meta['BLOCK_K']}"
            f"-g{meta['GROUP_M']}-w{config.num_warps}-s{config.num_stages}")


@triton.jit
def conv2d_spatial_kernel(
    # tensor descriptors: x as (N, H / stride_h, stride_h, W / stride_w, stride_w * C) (phase_view),
    # w as (K, R, S, C), out and residual as (N, P, Q, K)
    x_desc, w_desc, res_desc, out_desc,
    # pointers
    bias_ptr,
    # sizes
    N, C, K, P, Q, R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, UPCAST_DOT: tl.constexpr,
    NUM_SMS: tl.constexpr, BLOCK_IMG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tiles_h = tl.cdiv(P, BLOCK_H)
    tiles_w = tl.cdiv(Q, BLOCK_W)
    num_pid_m = tl.cdiv(N, BLOCK_IMG) * tiles_h * tiles_w
    num_pid_n = tl.cdiv(K, BLOCK_N)
    c_blocks = tl.cdiv(C, BLOCK_K)
    steps = R * S * c_blocks
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_k = pid_n * BLOCK_N
        off_img = pid_m // (tiles_h * tiles_w) * BLOCK_IMG
        off_p = pid_m // tiles_w % tiles_h * BLOCK_H
        off_q = pid_m % tiles_w * BLOCK_W
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(steps):
            tap = step // c_blocks
            r = tap // S
            s = tap % S
            c0 = (step % c_blocks) * BLOCK_K
            # The tap reads input row p * stride_h + r * dil_h - pad_h = (p + row_shift) * stride_h +
            # row_phase; shifted by stride * pad, both divisions are of non-negative numbers.
            reach_h = r * dil_h + (stride_h - 1) * pad_h
            reach_w = s * dil_w + (stride_w - 1) * pad_w
            # Negative and past-the-edge coordinates are the padding halo: TMA reads them as zeros.
            a = x_desc.load([off_img, off_p + reach_h // stride_h - pad_h, reach_h % stride_h,
                             off_q + reach_w // stride_w - pad_w, reach_w % stride_w * C + c0])
            a = a.reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([off_k, r, s, c0]).reshape(BLOCK_N, BLOCK_K)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        # The epilogue as conv2d_pointwise's, bias first (loading the residual first spills the widest tiles).
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, off_k, K, BLOCK_N)
        if HAS_RESIDUAL:
            acc += res_desc.load([off_img, off_p, off_q, off_k]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
        if RELU:
            acc = relu_keeping_nan(acc)
        out_desc.store([off_img, off_p, off_q, off_k],
                       acc.to(out_desc.dtype).reshape(BLOCK_IMG, BLOCK_H, BLOCK_W, BLOCK_N))


def shared_memory(config, element_size: int, has_residual: bool) -> int:
    """Bytes of shared memory a config holds: conv2d_pointwise's count for the same tiles, less one
    x tile. x's tile reaches the tensor cores through registers (Triton merges its spatial
    dimensions into the [BLOCK_M, BLOCK_K] matrix there, and wgmma reads it from registers), and
    Triton's pipeline keeps one stage fewer of an operand it loads into registers."""
    kw = config.kwargs
    x_tile = kw["BLOCK_M"] * kw["BLOCK_K"] * element_size
    return conv2d_pointwise.shared_memory(config, element_size, has_residual) - x_tile


def fits(config, x, has_residual: bool) -> bool:
    """Whether config's shared memory fits x's device."""
    return conv2d_pointwise.shared_memory_fits(shared_memory(config, x.element_size(), has_residual), x.device)


def spatial_shape(config) -> tuple[int, int, int]:
    """A config's spatial tile: (BLOCK_IMG, BLOCK_H, BLOCK_W)."""
    return config.kwargs["BLOCK_IMG"], config.kwargs["BLOCK_H"], config.kwargs["BLOCK_W"]


def column_tile(config) -> tuple[int, int, int, int]:
    """A config's COLUMN_TILES entry: (BLOCK_N, BLOCK_K, warps, stages)."""
    return config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages


def coverage(config, N: int, P: int, Q: int) -> float:
    """The share of the pixels its tiles compute that lie in the (N, P, Q) output: the rest, past
    the edges, are computed and clipped."""
    kw = config.kwargs
    tiled = (triton.cdiv(N, kw["BLOCK_IMG"]) * kw["BLOCK_IMG"] * triton.cdiv(P, kw["BLOCK_H"]) * kw["BLOCK_H"]
             * triton.cdiv(Q, kw["BLOCK_W"]) * kw["BLOCK_W"])
    return N * P * Q / tiled


def least_wasteful(configs, N: int, P: int, Q: int):
    """The configs of the first MAX_SHAPES shapes of each BLOCK_M (in SPATIAL_SHAPES order) that
    cover the output within COVERAGE_SLACK as well as the best shape of that BLOCK_M."""
    best = {}
    for config in configs:
        block_m = config.kwargs["BLOCK_M"]
        best[block_m] = max(best.get(block_m, 0.0), coverage(config, N, P, Q))
    offered = {}  # BLOCK_M -> the shapes offered, in order
    for config in configs:
        block_m, shape = config.kwargs["BLOCK_M"], spatial_shape(config)
        shapes = offered.setdefault(block_m, [])
        nearly_best = coverage(config, N, P, Q) >= COVERAGE_SLACK * best[block_m]
        if shape not in shapes and len(shapes) < MAX_SHAPES and nearly_best:
            shapes.append(shape)
    return [config for config in configs if spatial_shape(config) in offered[config.kwargs["BLOCK_M"]]]


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: the configs that fit the device, of the shapes that waste
    least on this layer."""
    args = {**named_args, **kwargs}  # the autotuner passes the keyword arguments apart
    fitting = [config for config in configs if fits(config, args["x_desc"].base, args["HAS_RESIDUAL"])]
    return least_wasteful(fitting, args["N"], args["P"], args["Q"])


def untimed_config(x, out, has_residual: bool):
    """The config to run where kernels cannot be timed: the interpreter's one, or on a GPU the first
    Hopper config that fits and wastes least on out's map."""
    if INTERPRETED:
        return conv2d_spatial_configs()[0]
    fitting = [config for config in conv2d_spatial_configs() if fits(config, x, has_residual)]
    return least_wasteful(fitting, out.shape[0], out.shape[2], out.shape[3])[0]


autotuned = triton.autotune(
    # The interpreter cannot time configs, so it runs the first of its set.
    configs=conv2d_spatial_configs()[:1] if INTERPRETED else conv2d_spatial_configs(),
    # As in conv2d_pointwise: float16 and bfloat16 layers share a choice (the same bytes move).
    key=["N", "C", "K", "P", "Q", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "HAS_RESIDUAL"],
    prune_configs_by=None if INTERPRETED else {"early_config_prune": prune_configs},
    do_bench=functools.partial(triton.testing.do_bench, warmup=10, rep=40),
)(conv2d_spatial_kernel)


def strided_pointwise(weight, stride, padding) -> bool:
    """Whether the layer is a 1x1 unpadded conv with a stride: a stride-1 1x1 conv over the pixels
    it reads (pixels_read), which this kernel takes as its x."""
    return weight.shape[2:] == (1, 1) and tuple(padding) == (0, 0) and tuple(stride) != (1, 1)


def pixels_read(x, weight, stride, padding):
    """x as the kernel reads it: for a strided 1x1 layer the view x[:, :, ::stride_h, ::stride_w],
    whose descriptor has the pixel strides multiplied; else x."""
    return x[:, :, :: stride[0], :: stride[1]] if strided_pointwise(weight, stride, padding) else x


def read_stride(weight, stride, padding) -> tuple[int, int]:
    """The stride the kernel runs with over pixels_read: 1 for a strided 1x1 layer (its view took
    the stride), the layer's own otherwise."""
    return (1, 1) if strided_pointwise(weight, stride, padding) else tuple(stride)


def phase_view(x, stride):
    """(shape, strides) of x's tensor map for a layer with this stride: (N, H / stride_h, stride_h,
    W / stride_w, stride_w * C), each row and column index split into a position and a phase
    (h = position * stride_h + phase), and a column's phases merged with its channels, which lie
    one after another where the pixels of a row are dense (as for any stride-1 layer, with one
    phase). None where x is no pixel grid, H or W is not a multiple of the stride, or a strided
    row's pixels are not dense."""
    grid = pixel_grid(x)
    if grid is None:
        return None
    (n, c, h, w), (stride_h, stride_w) = x.shape, stride
    n_stride, h_stride, w_stride = grid
    if h % stride_h or w % stride_w or (stride_w > 1 and w_stride != c):
        return None
    shape = [n, h // stride_h, stride_h, w // stride_w, stride_w * c]
    return shape, [n_stride, stride_h * h_stride, h_stride, stride_w * w_stride, 1]


def whole_channel_blocks(C: int) -> bool:
    """Whether every candidate's channel block divides C: where a column's phases are merged with
    its channels, a block past C would read the next phase's channels instead of zeros."""
    return all(C % config.kwargs["BLOCK_K"] == 0 for config in autotuned.configs)


def applies(x, weight, residual, out, stride, padding, dilation) -> bool:
    """Whether this kernel takes the layer: a filter larger than 1x1, at any stride where H and W
    are multiples of it (the phases of phase_view), with C a multiple of the channel block when
    strided; or a strided 1x1 layer without padding (strided_pointwise); float16/bfloat16, at least
    one output pixel, C and K multiples of 8, and x (as read), weight (channels_last: (K, R, S, C)
    memory), residual and out all pixel grids a tensor map can address (pixel_grid) with int32
    coordinates. The 1x1 stride-1 layers are conv2d_pointwise's."""
    K, C, R, S = weight.shape
    if (R, S) == (1, 1) and not strided_pointwise(weight, stride, padding):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or C % 8 or K % 8 or out.numel() == 0:
        return False
    # Coordinates, a tile past them, and a tap's reach (r*dil + (stride - 1)*pad in the kernel) are int32.
    reach = (dilation[0] * R + stride[0] * padding[0], dilation[1] * S + stride[1] * padding[1])
    if max(*x.shape, *out.shape, *padding, *reach) >= 2**31 - 512:
        return False
    kernel_stride = read_stride(weight, stride, padding)
    if kernel_stride[1] > 1 and not whole_channel_blocks(C):
        return False
    if phase_view(pixels_read(x, weight, stride, padding), kernel_stride) is None:
        return False
    return all(pixel_grid(t) is not None for t in (weight, out) + ((residual,) if residual is not None else ()))


def launch(x, weight, bias, residual, out, stride, padding, dilation, relu: bool, config=None):
    """Launches the kernel for a layer `applies` accepts (inputs checked by cnnfast.ops.conv2d; out
    allocated, (N, K, P, Q)). `config` (a triton.Config) bypasses autotuning."""
    stride_h, stride_w = read_stride(weight, stride, padding)
    x = pixels_read(x, weight, stride, padding)
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P, Q = out.shape[2:]

    def descriptor(t, dims):  # (N|K, H|R, W|S, channels) over t's memory; block shapes set per config
        return TensorDescriptor(t, dims, [*pixel_grid(t), 1], [1, 1, 1, 16])

    x_desc = TensorDescriptor(x, *phase_view(x, (stride_h, stride_w)), [1, 1, 1, 1, 16])
    w_desc = descriptor(weight, [K, R, S, C])
    out_desc = descriptor(out, [N, P, Q, K])
    res_desc = descriptor(residual, [N, P, Q, K]) if residual is not None else out_desc
    num_sms = conv2d_pointwise.multiprocessors(x)

    def grid(meta):
        tiles = triton.cdiv(N, meta["BLOCK_IMG"]) * triton.cdiv(P, meta["BLOCK_H"]) * triton.cdiv(Q, meta["BLOCK_W"])
        return (min(num_sms, tiles * triton.cdiv(K, meta["BLOCK_N"])),)

    def candidates():
        fitting = [config for config in autotuned.configs if fits(config, x, residual is not None)]
        return least_wasteful(fitting, N, P, Q)

    conv2d_pointwise.run_persistent(
        conv2d_spatial_kernel, autotuned, candidates, (x_desc, w_desc, res_desc, out_desc),
        (N, C, K, P, Q, R, S, stride_h, stride_w, padding[0], padding[1], dilation[0], dilation[1]),
        x, bias, residual, out, relu, grid, config)
    return out
