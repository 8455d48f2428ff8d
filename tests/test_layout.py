"""cnnfast.layout: which tensors the TMA kernels and the CUTLASS output address, and through which
strides. Every case is a tensor built the way a caller would build it (a channels_last map, a
channel slice of a wider one, a strided or broadcast view), with the answer worked out by hand."""
import pytest
import torch

from cnnfast.layout import pixel_grid, pixel_rows

CHANNELS_LAST = torch.channels_last


def nhwc(n, c, h, w, dtype=torch.float16):
    return torch.zeros(n, c, h, w, dtype=dtype).contiguous(memory_format=CHANNELS_LAST)


def pitch(t):
    rows = pixel_rows(t)
    return rows[1] if rows is not None else None


@pytest.mark.parametrize(
    "shape, slice_start, wide, expected",
    [((2, 16, 3, 5), 8, 40, 40), ((2, 16, 3, 5), 4, 40, None), ((2, 16, 3, 5), 8, 36, None),
     ((2, 16, 1, 1), 16, 48, 48), ((1, 16, 1, 1), 8, 40, 16), ((2, 16, 3, 5), 0, 16, 16),
     ((2, 16, 1, 5), 8, 40, 40), ((2, 16, 3, 1), 8, 40, 40)],
    ids=["slice", "slice-misaligned", "pitch-not-16-bytes", "1x1-map", "one-pixel", "dense", "one-row",
         "one-column"],
)
def test_pixel_rows_of_channel_slices(shape, slice_start, wide, expected):
    """An Inception branch's channel slice of a channels_last map is pixel rows (written in place)
    when its pitch and start are 16-byte aligned; otherwise the kernels write scratch, copied into it."""
    n, k, p, q = shape
    big = nhwc(n, wide, p, q)
    assert pitch(big[:, slice_start : slice_start + k]) == expected


@pytest.mark.parametrize("slice_start, wide, expected", [(4, 36, 36), (2, 36, None), (4, 34, None)],
                         ids=["aligned", "start-misaligned", "pitch-not-16-bytes"])
def test_pixel_rows_of_float32_channel_slices(slice_start, wide, expected):
    # float32 fills a 16-byte row with 4 channels: a pitch of 36 works, which float16 refuses.
    big = nhwc(2, wide, 3, 5, dtype=torch.float32)
    assert pitch(big[:, slice_start : slice_start + 16]) == expected


def test_pixel_rows_counts_every_pixel():
    assert pixel_rows(nhwc(3, 8, 5, 7)) == (105, 8)


@pytest.mark.parametrize(
    "view",
    [lambda t: t.contiguous(), lambda t: t[:, :, ::2], lambda t: t[:, :, :, 1:4],
     lambda t: t[:, :, :, :1].expand(-1, -1, -1, 6)],
    ids=["nchw", "strided-rows", "cropped-columns", "broadcast"],
)
def test_pixel_rows_refuses_pixels_not_one_pitch_apart(view):
    assert pixel_rows(view(nhwc(2, 16, 6, 6))) is None


def test_pixel_grid_of_dense_and_sliced_maps():
    assert pixel_grid(nhwc(2, 16, 3, 5)) == (3 * 5 * 16, 5 * 16, 16)
    assert pixel_grid(nhwc(2, 40, 3, 5)[:, 8:24]) == (3 * 5 * 40, 5 * 40, 40)


def test_pixel_grid_of_strided_and_cropped_views():
    """The strided 1x1 layers read x[:, :, ::2, ::2]; a crop of a map keeps the map's strides."""
    x = nhwc(2, 16, 8, 8)
    assert pixel_grid(x[:, :, ::2, ::2]) == (8 * 8 * 16, 2 * 8 * 16, 2 * 16)
    assert pixel_grid(x[:, :, 1:7, 2:5]) == (8 * 8 * 16, 8 * 16, 16)


def test_pixel_grid_gives_size_one_dimensions_their_dense_stride():
    """PyTorch leaves a size-1 dimension's stride arbitrary (here 1, which is not on the 16-byte grid)."""
    t = torch.zeros(1, 16, 1, 4, dtype=torch.float16).as_strided((1, 16, 1, 4), (1, 1, 1, 16))
    assert pixel_grid(t) == (4 * 16, 4 * 16, 16)


def nhwc_at(offset, n, c, h, w):
    """A dense NHWC map whose data starts `offset` float16 elements into its storage."""
    storage = torch.zeros(offset + n * h * w * c, dtype=torch.float16)
    return storage[offset:].view(n, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "make",
    [lambda: nhwc(2, 16, 6, 6).contiguous(), lambda: nhwc(2, 16, 6, 1).expand(-1, -1, -1, 6),
     lambda: nhwc(2, 16, 6, 6).as_strided((2, 16, 6, 6), (6 * 6 * 16, 1, 16, 16)),
     lambda: nhwc(2, 12, 6, 6)[:, :8], lambda: nhwc_at(4, 2, 16, 6, 6)],
    ids=["nchw", "broadcast", "overlapping-rows", "pitch-not-16-bytes", "base-misaligned"],
)
def test_pixel_grid_refuses_what_a_tensor_map_cannot_read(make):
    assert pixel_grid(make()) is None


def test_pixel_grid_takes_an_aligned_offset():
    assert pixel_grid(nhwc_at(8, 2, 16, 6, 6)) == (6 * 6 * 16, 6 * 16, 16)
