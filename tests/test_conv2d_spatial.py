"""The persistent TMA kernel of stride-1 convs on spatial tiles (cnnfast/triton_kernels/conv2d_spatial.py),
under the interpreter and through the public op (backend="triton"): which layers it takes, how it
picks tile shapes, its results against float64 on many shapes (padding halos, dilation, partial
image, row, column, channel and reduction tiles) and every epilogue, into channel slices, exactly
on integers, NaN confined to the pixels that read it, and the measured choice between it and the
implicit GEMM."""
import pytest
import torch

from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels import conv2d_spatial
from tests.test_conv2d import (
    CHANNELS_LAST, EPILOGUES, NAN, Conv, conv_id, make_inputs, nan_output, reference_conv2d, run_conv2d,
)
from tests.test_conv2d_pointwise import (
    HALF_DTYPES, check_epilogue, check_failure_falls_back, check_integer_values_exact, check_into_a_channel_slice, check_measured_choice,
    inception_branch_widths, layer, recorded_launches,
)

# Under the interpreter the kernel runs tiles of 2 images x 4 rows x 8 columns of pixels, 16 output
# channels and 16 input channels per step, on a persistent grid of 4 programs.
SHAPES = [
    # N = 3: a half-empty image block; 5x7 map: partial row and column blocks; C = 40: a partial last
    # channel step; K = 24: a partial column tile
    Conv(3, 40, 5, 7, 24, 3, 3, padding=1),
    Conv(2, 16, 9, 6, 40, 5, 5, padding=2),  # 5x5 taps, 9 tiles: one program walks three
    Conv(1, 8, 4, 4, 8, 3, 3, padding=1),  # the narrowest rows TMA takes: 8 channels of 2 bytes
    Conv(2, 16, 6, 9, 16, 3, 5, padding=(0, 2), dilation=(1, 2)),  # unpadded rows, dilated columns
    Conv(1, 24, 1, 1, 16, 3, 3, padding=1),  # one pixel: only the centre tap inside the map
    Conv(2, 16, 5, 5, 16, 2, 2, padding=3),  # padding 3 > kernel - 1: whole rows of the halo
    Conv(5, 8, 3, 19, 16, 3, 3, padding=1),  # three image blocks and three column blocks
    Conv(3, 24, 9, 7, 16, 1, 1, stride=2),  # a downsample conv, over every other pixel; odd H and W
    Conv(2, 16, 5, 12, 24, 1, 1, stride=(1, 3)),  # a stride along W only
    # Strided filters, over the phases of x: ResNet's stride-2 3x3 (4x5 outputs: partial tiles),
    # unequal strides with a 5x5 filter, and unpadded rows with dilated, widely padded columns.
    Conv(2, 32, 8, 10, 24, 3, 3, stride=2, padding=1),
    Conv(1, 16, 12, 6, 16, 5, 5, stride=(3, 2), padding=2),
    Conv(3, 16, 8, 8, 8, 3, 3, stride=2, padding=(0, 3), dilation=(1, 2)),
    # Strided outputs past one tile: 5x10 (a second row and a second column tile), and 6x18 under
    # unequal strides (three column tiles), so that each tile's phase coordinates are checked.
    Conv(2, 16, 10, 20, 16, 3, 3, stride=2, padding=1),
    Conv(1, 16, 18, 36, 16, 3, 3, stride=(3, 2), padding=1),
]


@pytest.fixture
def launches(monkeypatch):
    return recorded_launches(monkeypatch, conv2d_spatial)


@pytest.mark.parametrize("case, takes", [
    ("channels_last", True),
    ("float32", False),  # stays on the implicit GEMM, whose TF32 follows cuDNN's setting
    ("channels_12", False),  # 24-byte pixels: not a multiple of 16 bytes
    ("stride_2", True),  # over the phases of an 8x6 map
    ("stride_2_odd_map", False),  # 5 rows: the last phase would be a row short
    ("stride_2_channels_24", False),  # a channel block past 24 would read the next column's channels
    ("stride_2_channel_slice_input", False),  # a row's pixels not dense: phases cannot merge with channels
    ("stride_1_channel_slice_input", True),
    ("kernel_1x1", False),  # conv2d_pointwise's
    ("kernel_1x1_stride_2", True),  # over x[:, :, ::2, ::2]
    ("kernel_1x1_stride_2_padding_1", False),
    ("kernel_5x5_dilation_2", True),
    ("nchw_input", False),
    ("nchw_weight", False),  # (K, C, R, S) memory: a tap's channels are not one run
    ("storage_offset_input", False),  # 10 bytes in: a base address off the 16-byte grid
    ("expanded_input", False),
    ("nchw_out", False),
    ("aligned_channel_slice_out", True),  # pixel pitch K + 16 channels, slice from channel 8
    ("misaligned_channel_slice_out", False),  # slice from channel 3
    ("pitch_off_16_bytes_out", False),  # a slice of K + 4 channels: 56-byte pixels
    ("overlapping_out", False),  # pixels 8 channels apart, 24 channels each
    ("aligned_channel_slice_input", True),
    ("nchw_residual", False),
    ("no_residual", True),
])
def test_takes_the_layers_tma_can_address(case, takes):
    conv = Conv(2, 16, 5, 6, 24, 3, 3, padding=1)
    dtype = torch.float32 if case == "float32" else torch.float16
    stride, padding, dilation = (1, 1), (1, 1), (1, 1)
    if case == "channels_12":
        conv = conv._replace(c=12)
    if case.startswith("stride_2"):
        conv, stride = conv._replace(h=8, stride=2), (2, 2)
    if case == "stride_2_odd_map":
        conv = conv._replace(h=5)
    if case == "stride_2_channels_24":
        conv = conv._replace(c=24)
    if case.startswith("kernel_1x1"):
        conv, padding = conv._replace(r=1, s=1, padding=0), (0, 0)
    if case.startswith("kernel_1x1_stride_2"):
        conv, stride = conv._replace(stride=2), (2, 2)
    if case == "kernel_1x1_stride_2_padding_1":
        conv, padding = conv._replace(padding=1), (1, 1)
    if case == "kernel_5x5_dilation_2":
        conv, padding, dilation = conv._replace(r=5, s=5, padding=4, dilation=2), (4, 4), (2, 2)
    x, weight, res, out = layer(conv, dtype, residual=case != "no_residual",
                                x_layout={"nchw_input": "nchw", "storage_offset_input": "storage_offset",
                                          "expanded_input": "expanded"}.get(case, "channels_last"),
                                out_layout="nchw" if case == "nchw_out" else "channels_last")
    if case.endswith("channel_slice_out"):
        first = 8 if case.startswith("aligned") else 3
        n, k, h, w = out.shape
        out = nan_output((n, k + 16, h, w), dtype)[:, first : first + k]
    if case == "pitch_off_16_bytes_out":
        n, k, h, w = out.shape
        out = nan_output((n, k + 4, h, w), dtype)[:, :k]
    if case == "overlapping_out":
        n, k, h, w = out.shape
        out = torch.empty(n * h * w * 8 + k, dtype=dtype).as_strided(out.shape, (h * w * 8, 1, w * 8, 8))
    if case in ("aligned_channel_slice_input", "stride_2_channel_slice_input", "stride_1_channel_slice_input"):
        x = torch.cat([x, x], dim=1).contiguous(memory_format=CHANNELS_LAST)[:, 8 : 8 + conv.c]
    if case == "nchw_weight":
        weight = weight.contiguous()
    if case == "nchw_residual":
        res = res.contiguous()
    if case == "stride_1_channel_slice_input":
        stride = (1, 1)
    assert conv2d_spatial.applies(x, weight, res, out, stride, padding, dilation) == takes


def test_refuses_problems_past_int32_coordinates_and_empty_ones():
    weight = torch.empty(8, 8, 3, 3, dtype=torch.float16, device="meta").contiguous(memory_format=CHANNELS_LAST)
    wide = torch.empty(1, 8, 2, 2**31 - 256, dtype=torch.float16, device="meta").contiguous(memory_format=CHANNELS_LAST)
    assert not conv2d_spatial.applies(wide, weight, None, wide, (1, 1), (1, 1), (1, 1))
    x = torch.empty(1, 8, 4, 4, dtype=torch.float16, device="meta").contiguous(memory_format=CHANNELS_LAST)
    assert conv2d_spatial.applies(x, weight, None, x, (1, 1), (1, 1), (1, 1))
    assert not conv2d_spatial.applies(x, weight, None, x, (1, 1), (2**30, 2**30), (2**30, 2**30))  # the filter's reach
    # A tap's reach in the kernel, r*dil + (stride - 1)*pad: 2047 * 2^21 passes int32.
    tall, column = (torch.empty(shape, dtype=torch.float16, device="meta").contiguous(memory_format=CHANNELS_LAST)
                    for shape in ((1, 16, 2048, 1), (16, 16, 3, 1)))
    one_pixel = torch.empty(1, 16, 1, 1, dtype=torch.float16, device="meta").contiguous(memory_format=CHANNELS_LAST)
    assert conv2d_spatial.applies(tall, column, None, one_pixel, (2048, 1), (1, 0), (1, 1))
    assert not conv2d_spatial.applies(tall, column, None, one_pixel, (2048, 1), (2**21, 0), (1, 1))
    empty = torch.empty(0, 8, 3, 3, dtype=torch.float16).contiguous(memory_format=CHANNELS_LAST)
    assert not conv2d_spatial.applies(empty, weight, None, empty, (1, 1), (1, 1), (1, 1))


def shapes_offered(n, p, q, block_m):
    configs = conv2d_spatial.least_wasteful(conv2d_spatial.conv2d_spatial_configs(interpreted=False), n, p, q)
    shapes = [conv2d_spatial.spatial_shape(c) for c in configs
              if c.kwargs["BLOCK_M"] == block_m]
    return list(dict.fromkeys(shapes))


def test_tile_shapes_offered_are_those_that_waste_least():
    """Coverage by hand: a 28x28 map in 8x16 tiles computes 32x32 pixels (784 / 1024); 4x4 tiles of
    8 images divide it. Each map of ResNet-50 at batch 256 is offered the two shapes (of each size)
    that waste nothing and read the fewest input pixels; at batch 1 a 7x7 map the shape that wastes
    least (8x8: 49 of 64 pixels)."""
    assert conv2d_spatial.coverage(conv2d_spatial.spatial_config(1, 8, 16, 128, 64, 8, 4), 256, 28, 28) == 784 / 1024
    assert conv2d_spatial.coverage(conv2d_spatial.spatial_config(8, 4, 4, 128, 64, 8, 4), 256, 28, 28) == 1.0
    assert shapes_offered(256, 56, 56, 128) == [(2, 8, 8), (8, 4, 4)]
    assert shapes_offered(256, 28, 28, 128) == [(8, 4, 4), (32, 2, 2)]
    assert shapes_offered(256, 14, 14, 128) == [(32, 2, 2), (128, 1, 1)]
    assert shapes_offered(256, 7, 7, 128) == [(128, 1, 1)]
    assert shapes_offered(256, 56, 56, 64) == [(1, 8, 8), (4, 4, 4)]
    assert shapes_offered(256, 7, 7, 64) == [(64, 1, 1)]
    assert shapes_offered(1, 7, 7, 64) == [(1, 8, 8)]
    # Every column tile of each offered shape stays on offer.
    offered = conv2d_spatial.least_wasteful(conv2d_spatial.conv2d_spatial_configs(interpreted=False), 256, 7, 7)
    assert len(offered) == len(conv2d_spatial.COLUMN_TILES[128]) + len(conv2d_spatial.COLUMN_TILES[64])


@pytest.mark.parametrize("conv, epilogue, dtype", [
    pytest.param(conv, epilogue, HALF_DTYPES[(i + j) % 2], id=f"{conv_id(conv)}-{epilogue}-{HALF_DTYPES[(i + j) % 2]}")
    for i, conv in enumerate(SHAPES) for j, epilogue in enumerate(EPILOGUES)
])
def test_matches_reference(launches, conv, epilogue, dtype):
    """Every epilogue (no bias, a bias in the input's dtype or in float32, residual, ReLU) on each
    shape, against float64, in float16 and bfloat16 in turn (each epilogue and each shape gets
    both); into a NaN-filled out= or a new tensor, in turn (likewise)."""
    check_epilogue(conv, epilogue, dtype, into_out=(SHAPES.index(conv) + list(EPILOGUES).index(epilogue)) // 2 % 2 == 1)
    assert len(launches) == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("first", [8, 3], ids=["aligned", "misaligned"])
def test_into_a_channel_slice(launches, first, dtype):
    """Inception's 3x3 branches write channel slices of one channels_last tensor: a slice on the
    16-byte grid is written by TMA (which must clip its stores to it), any other by the implicit
    GEMM; either way exactly the slice."""
    check_into_a_channel_slice(Conv(2, 24, 5, 6, 24, 3, 3, padding=1), first, dtype, launches)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_reads_a_crop_of_a_larger_map_and_not_its_neighbours(launches, dtype):
    """x as channels 8.. of a crop (rows 1.., columns 2..) of a larger NaN-filled map, and the
    residual likewise: the halo past the crop's edge must read as zeros, not as the NaN pixels
    around it in memory."""
    conv = Conv(2, 16, 5, 7, 24, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, residual = make_inputs(conv, dtype)

    def crop_of_nan_map(t):
        n, c, h, w = t.shape
        big = nan_output((n, c + 8, h + 3, w + 4), dtype)
        big[:, 8:, 1 : 1 + h, 2 : 2 + w] = t
        return big[:, 8:, 1 : 1 + h, 2 : 2 + w]

    x_crop, residual_crop = crop_of_nan_map(x), crop_of_nan_map(residual)
    out = run_conv2d(conv, x_crop, weight, bias, residual_crop, relu=True)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, residual, relu=True), "conv")
    assert len(launches) == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("conv", [Conv(3, 40, 5, 7, 24, 3, 3, padding=1),
                                  Conv(2, 32, 8, 10, 24, 3, 3, stride=2, padding=1)], ids=["stride_1", "stride_2"])
def test_integer_values_are_exact(launches, conv, dtype):
    """Small integers make every product and sum exact in float32 and the result exact in the
    dtype: any tap read from the wrong pixel (or phase), a halo not zero, a step skipped or
    repeated changes a value."""
    check_integer_values_exact(conv, dtype, weight_limit=1)
    assert len(launches) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("conv, pixel, rows, columns", [
    (Conv(1, 16, 6, 7, 8, 3, 3, padding=1), (1, 2), slice(0, 3), slice(1, 4)),
    # Output row p reads input rows 2p - 1 .. 2p + 1: row 2 is read by p = 1 alone, column 3 by q = 1 and 2.
    (Conv(1, 16, 8, 10, 8, 3, 3, stride=2, padding=1), (2, 3), slice(1, 2), slice(1, 3)),
], ids=["stride_1", "stride_2"])
def test_nan_reaches_exactly_the_pixels_that_read_it(launches, conv, pixel, rows, columns):
    """A NaN pixel of x makes the output pixels whose window holds it NaN in every channel,
    through the ReLU, and no other: the tiles around it (and the zero halo) stay finite."""
    torch.manual_seed(0)
    x, weight, bias, _ = make_inputs(conv, torch.float16, residual=False)
    x[0, :, pixel[0], pixel[1]] = NAN
    out = run_conv2d(conv, x, weight, bias, relu=True)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, relu=True), "conv")
    reads_it = torch.zeros(out.shape[2:], dtype=torch.bool)
    reads_it[rows, columns] = True
    assert out[0][:, reads_it].isnan().all()
    assert out[0][:, ~reads_it].isfinite().all()
    assert len(launches) == 1


@pytest.mark.parametrize("tma_faster", [True, False], ids=["tma_faster", "implicit_gemm_faster"])
def test_the_kernel_measured_faster_runs_and_the_choice_is_kept(monkeypatch, launches, tma_faster):
    """As for the 1x1 kernel: the first call times both kernels at their tuned tiles (a stand-in
    clock here), keeps the faster, and later calls launch it without timing; the benchmark names
    the kernel that ran."""
    check_measured_choice(monkeypatch, launches, Conv(2, 16, 5, 7, 24, 3, 3, padding=1), tma_faster,
                          "tma-2x4x8-16x16-g8-w4-s1")


def test_a_tma_kernel_that_fails_leaves_the_layer_to_the_implicit_gemm_with_a_warning(monkeypatch):
    check_failure_falls_back(monkeypatch, conv2d_spatial, Conv(2, 16, 5, 7, 24, 3, 3, padding=1),
                             r"TMA conv kernel conv2d_spatial failed on \(2, 16, 5, 7\) -> 24 .*stand-in failure")


def test_applies_to_the_real_layers_and_inceptions_slices():
    """Every stride-1 layer of the architectures with a filter larger than 1x1 and more than 3
    input channels (the C = 3 stems are not 16-byte pixels), and every strided 1x1 layer (ResNet's
    downsample convs), takes the kernel in bfloat16, at the real layers' test size; GoogLeNet's 3x3
    branches write channel slices that start on a multiple of 8 channels, so TMA writes them."""
    from tests.test_conv2d import REAL_LAYERS, real_layer_problem

    spatial = [layer_ for layer_ in REAL_LAYERS if (layer_[2] != (1, 1)) == (layer_[3] == (1, 1))]
    assert len(spatial) > 20 and {layer_[2] for layer_ in spatial} >= {(3, 3), (5, 5), (1, 1)}
    for c, k, kernel, stride, padding in spatial:
        conv = real_layer_problem(c, k, kernel, stride, padding)
        x, weight, res, out = layer(conv, torch.bfloat16)
        assert conv2d_spatial.applies(x, weight, res, out, stride, padding, (1, 1)) == (c != 3), (c, k, kernel)
    for widths in inception_branch_widths():
        assert widths[0] % 8 == 0 and (widths[0] + widths[1]) % 8 == 0, widths


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet152", "googlenet", "alexnet", "zfnet"])
def test_applies_to_the_strided_layers_at_their_real_size(monkeypatch, arch):
    """At the architectures' own input sizes (224, AlexNet 227), with the Hopper configs' channel
    block of 64: every strided layer with a filter larger than 1x1 takes the kernel but the C = 3
    stems, layers on odd maps and ZFNet's 96-channel conv2 (96 is no multiple of 64); ResNet's
    stride-2 3x3 layers (three per network) all do, and the other architectures' strided layers
    are all refused (VGG has none)."""
    from cnnfast.analysis import analyze_arch, conv_problems

    monkeypatch.setattr(conv2d_spatial.autotuned, "configs", conv2d_spatial.conv2d_spatial_configs(interpreted=False))
    taken, checked = [], []
    for problem in conv_problems(analyze_arch(arch)):
        if problem.stride == (1, 1) or (problem.R, problem.S) == (1, 1):
            continue
        checked.append(problem)
        conv = Conv(256, problem.C, problem.H, problem.W, problem.K, problem.R, problem.S, problem.stride,
                    problem.padding)
        shapes = ((conv.n, conv.c, conv.h, conv.w), (conv.k, conv.c, conv.r, conv.s), conv.output_shape())
        x, weight, out = (torch.empty(shape, dtype=torch.bfloat16, device="meta")
                          .contiguous(memory_format=CHANNELS_LAST) for shape in shapes)
        expected = problem.C % 64 == 0 and problem.H % problem.stride[0] == 0 and problem.W % problem.stride[1] == 0
        assert conv2d_spatial.applies(x, weight, None, out, problem.stride, problem.padding, (1, 1)) == expected
        taken += [problem] if expected else []
    assert checked
    if arch.startswith("resnet"):
        assert [(p.R, p.S, p.stride) for p in taken] == [(3, 3, (2, 2))] * 3
    else:
        assert taken == []
