"""Small cases of every CUDA kernel, run under compute-sanitizer by device_check.sh.

Exits non-zero if any result is wrong; the sanitizer reports memory errors, races and reads of
uninitialized memory on its own.
"""
import torch
import torch.nn.functional as F

from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels.add_relu import add_relu, add_relu_flat_configs, add_relu_strided_configs, is_flat
from cnnfast.triton_kernels.conv2d import (
    config_fits, conv2d_bias_act, conv2d_configs, split_k_configs, use_flat_reduction,
)
from cnnfast.triton_kernels import conv2d_pointwise, conv2d_spatial
from cnnfast.triton_kernels.gap_linear import gap_linear, linear_bias_configs
from cnnfast.triton_kernels.global_avg_pool import global_avg_pool, global_avg_pool_configs
from tests.test_add_relu import reference_add_relu
from tests.test_gap_linear import make_head, reference_gap_linear
from tests.test_global_avg_pool import LAYOUTS, make_input, reference_global_avg_pool


def triton_cases() -> int:
    """Every config of the memory-bound Triton kernels, through their launchers (autotuning would
    time hundreds of launches under the sanitizer)."""
    runs = []  # (output, float64 reference, tolerance kind)
    shape = (3, 130, 5, 7)  # no block size divides N, C or H*W: every mask is exercised
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("channels_last", "channel_slice"):  # the flat and the strided add_relu
            x, y = make_input(shape, dtype, "cuda", layout), make_input(shape, dtype, "cuda")
            runs += [(global_avg_pool(x, config=c), reference_global_avg_pool(x), "elementwise")
                     for c in global_avg_pool_configs(interpreted=False)]
            add_relu_configs = add_relu_flat_configs if is_flat(x, y, torch.empty_like(y)) else add_relu_strided_configs
            runs += [(add_relu(x, y, torch.empty_like(y), relu=True, config=c), reference_add_relu(x, y), "elementwise")
                     for c in add_relu_configs(interpreted=False)]
            weight, bias = make_head((*shape, 33), dtype, "cuda")
            runs += [(gap_linear(x, weight, bias, config=c), reference_gap_linear(x, weight, bias), "conv")
                     for c in linear_bias_configs(interpreted=False, float32=dtype == torch.float32)]
    torch.cuda.synchronize()
    for out, reference, kind in runs:
        assert_close_to_reference(out, reference, kind)
    return len(runs)


def conv2d_cases() -> int:
    """Each config of the conv kernel, split-K ones included, on small problems of both reduction
    orders (a C=3 stem and a C=64 3x3 layer), with bias, residual and ReLU, written into a channel
    slice of a NaN tensor."""
    runs = 0
    for c, k, kernel, stride, padding in [(3, 24, 7, 2, 3), (64, 40, 3, 1, 1)]:
        x = make_input((2, c, 9, 11), torch.bfloat16, "cuda")
        w = torch.randn(k, c, kernel, kernel, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        b = torch.randn(k, device="cuda")
        reference = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
        residual = torch.randn(reference.shape, device="cuda").to(torch.bfloat16)
        reference = torch.relu(reference + residual.double())
        flat = use_flat_reduction(c)
        for config in conv2d_configs(flat=flat) + split_k_configs(flat=flat):
            if not config_fits(config, torch.bfloat16, x.device):
                continue
            big = torch.full((2, k + 8, *reference.shape[2:]), float("nan"), device="cuda", dtype=torch.bfloat16)
            out = big.contiguous(memory_format=torch.channels_last)[:, 4 : 4 + k]
            conv2d_bias_act(x, w, b, residual, out, (stride, stride), (padding, padding), (1, 1), True, config=config)
            assert_close_to_reference(out, reference, "conv")
            runs += 1
    return runs


def conv2d_pointwise_cases() -> int:
    """Each config of the persistent TMA kernel of 1x1 convs that fits, with a residual and without
    (its descriptor then unread), on a layer with partial row and column tiles (M = 2*9*11 pixels,
    K = 72) and a partial last reduction step (C = 40), with bias and ReLU, written into a
    16-byte-aligned channel slice of a NaN tensor (TMA must clip its stores to the slice)."""
    x = make_input((2, 40, 9, 11), torch.bfloat16, "cuda")
    w = torch.randn(72, 40, 1, 1, device="cuda").to(torch.bfloat16)
    b = torch.randn(72, device="cuda")
    conv = F.conv2d(x.double(), w.double(), b.double())
    runs = 0
    for residual in (torch.randn(conv.shape, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
                     None):
        reference = torch.relu(conv + residual.double() if residual is not None else conv)
        for config in conv2d_pointwise.conv2d_pointwise_configs():
            if not conv2d_pointwise.fits(config, x, has_residual=residual is not None):
                continue
            big = torch.full((2, 88, 9, 11), float("nan"), device="cuda", dtype=torch.bfloat16)
            big = big.contiguous(memory_format=torch.channels_last)
            out = big[:, 8:80]
            conv2d_pointwise.launch(x, w, b, residual, out, (1, 1), (0, 0), (1, 1), True, config=config)
            assert_close_to_reference(out, reference, "conv")
            assert big[:, :8].isnan().all() and big[:, 80:].isnan().all()
            runs += 1
    return runs


def conv2d_spatial_cases() -> int:
    """The spatial TMA kernel: for each tile size, its first column tile with its first and its
    last shape (pixels of one image, single pixels of many), with a residual and without, on a 3x3
    stride-1 layer with its padding halo and a 1x1 stride-2 one (over every other pixel), whose
    maps, batch, channels and columns no tile divides (3 x 40 x 9 x 11 in, K = 72), and a 3x3
    stride-2 one over x's phases (3 x 64 x 10 x 14 in: 5 x 7 out), each written into a
    16-byte-aligned channel slice of a NaN tensor."""
    checked = []
    for config in conv2d_spatial.conv2d_spatial_configs():
        shapes = conv2d_spatial.SPATIAL_SHAPES[config.kwargs["BLOCK_M"]]
        first_tile = conv2d_spatial.COLUMN_TILES[config.kwargs["BLOCK_M"]][0]
        if conv2d_spatial.column_tile(config) == first_tile and conv2d_spatial.spatial_shape(config) in (shapes[0], shapes[-1]):
            checked.append(config)
    runs = 0
    for x_shape, kernel, stride, padding in (((3, 40, 9, 11), 3, 1, 1), ((3, 40, 9, 11), 1, 2, 0),
                                             ((3, 64, 10, 14), 3, 2, 1)):
        x = make_input(x_shape, torch.bfloat16, "cuda")
        w = torch.randn(72, x_shape[1], kernel, kernel, device="cuda").to(torch.bfloat16)
        w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(72, device="cuda")
        conv = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=padding)
        residual = torch.randn(conv.shape, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        for res in (residual, None):
            reference = torch.relu(conv + res.double() if res is not None else conv)
            for config in checked:
                big = torch.full((3, 88, *conv.shape[2:]), float("nan"), device="cuda", dtype=torch.bfloat16)
                big = big.contiguous(memory_format=torch.channels_last)
                out = big[:, 8:80]
                conv2d_spatial.launch(x, w, b, res, out, (stride, stride), (padding, padding), (1, 1), True, config=config)
                assert_close_to_reference(out, reference, "conv")
                assert big[:, :8].isnan().all() and big[:, 80:].isnan().all()
                runs += 1
    return runs


def cutlass_conv2d_cases() -> int:
    """The CUTLASS conv on small problems: with and without residual, bias and ReLU, stride 2,
    channel counts that are not multiples of 8, both tile widths (64-wide in float16/bfloat16
    for the ReLU cases with K=24 and the stem's K=13 padded to 16, 128-wide for the others) and the
    1x1 GEMM (float16/bfloat16, K=72 with ReLU; in float32 the fprop)."""
    runs = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # float32 as TF32
        # (3, 13, 7, ...): a C=3 stem with K=13, both padded to 8 channels by the launcher;
        # (32, 72, 1, 1, 0, ...): a 1x1 stride-1 layer, the GEMM in float16/bfloat16, with the
        # residual and without (beta = 0: C is never read).
        for c, k, kernel, stride, padding, residual, relu in [
            (16, 24, 3, 1, 1, True, True), (24, 96, 3, 2, 1, True, True), (32, 16, 1, 2, 0, False, False),
            (3, 13, 7, 2, 3, True, True), (32, 72, 1, 1, 0, True, True), (32, 72, 1, 1, 0, False, True)]:
            x = make_input((2, c, 9, 11), dtype, "cuda")
            w = torch.randn(k, c, kernel, kernel, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
            b = torch.randn(k, device="cuda")
            reference = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
            res = torch.randn(reference.shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
            res = res if residual else None
            # Into a channel slice of a wider NaN tensor: written in place when k fills 16-byte rows.
            big = torch.full((2, k + 16, *reference.shape[2:]), float("nan"), device="cuda", dtype=dtype)
            big = big.contiguous(memory_format=torch.channels_last)
            out = big[:, 8 : 8 + k]
            ops.conv2d(x, w, b, stride=stride, padding=padding, residual=res, relu=relu, out=out, backend="cuda")
            if res is not None:
                reference = reference + res.double()
            kind = "tf32" if dtype == torch.float32 else "conv"
            assert_close_to_reference(out, torch.relu(reference) if relu else reference, kind)
            assert big[:, :8].isnan().all() and big[:, 8 + k :].isnan().all()
            runs += 1
    return runs


def main():
    torch.manual_seed(0)
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in LAYOUTS:
            for shape in [(2, 24, 3, 5), (1, 3, 2, 2), (3, 130, 4, 1)]:
                x = make_input(shape, dtype, "cuda", layout)
                y = make_input(shape, dtype, "cuda")  # channels_last: the flat kernel when x is too
                weight, bias = make_head((*shape, 10), dtype, "cuda", torch.float32)
                pooled, summed = ops.global_avg_pool(x, backend="cuda"), ops.add_relu(x, y, backend="cuda")
                headed = ops.gap_linear(x, weight, bias, backend="cuda")
                torch.cuda.synchronize()
                assert_close_to_reference(pooled, reference_global_avg_pool(x), "elementwise")
                assert_close_to_reference(summed, reference_add_relu(x, y), "elementwise")
                assert_close_to_reference(headed, reference_gap_linear(x, weight, bias), "conv")
                cases += 3
    # gap_linear's tensor-core path (batches above 32), with C a multiple of 8 and not.
    for dtype in (torch.float16, torch.bfloat16):
        for shape in [(40, 24, 3, 5, 70), (40, 36, 2, 2, 65)]:
            x = make_input(shape[:4], dtype, "cuda")
            weight, bias = make_head(shape, dtype, "cuda")
            assert_close_to_reference(ops.gap_linear(x, weight, bias, backend="cuda"),
                                      reference_gap_linear(x, weight, bias), "conv")
            cases += 1
    print(f"sanitizer cases: {cases} CUDA runs (global_avg_pool, add_relu, gap_linear) checked")
    print(f"sanitizer cases: {triton_cases()} Triton runs (global_avg_pool, add_relu, gap_linear) checked")
    print(f"sanitizer cases: {conv2d_cases()} Triton conv2d runs checked")
    print(f"sanitizer cases: {conv2d_pointwise_cases()} Triton 1x1 conv2d (TMA) runs checked")
    print(f"sanitizer cases: {conv2d_spatial_cases()} Triton conv2d on spatial tiles (TMA) runs checked")
    print(f"sanitizer cases: {cutlass_conv2d_cases()} CUDA (CUTLASS) conv2d runs checked")


if __name__ == "__main__":
    main()
