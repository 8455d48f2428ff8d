"""How a kernel that addresses an NHWC tensor by its strides sees a 4-D (N, C, H, W) tensor: as
pixel rows (one matrix of N*H*W rows, a fixed pitch apart) or as a pixel grid (three pixel strides).

Both answers are for the Hopper copy engine's tensor maps (the Triton TMA convolutions) and for
the CUTLASS convolution, which writes its output through a pixel pitch; each needs a dense run of
channels per pixel, its base and strides on the 16-byte grid and pixels that do not overlap. The
strides of size-1 dimensions, which PyTorch leaves arbitrary, do not count.
"""
import torch

TMA_ALIGNMENT = 16  # bytes: a tensor map's base address and every stride but the innermost


def pixel_rows(t: torch.Tensor):
    """(rows, pitch) of a 4-D tensor whose N*H*W pixels lie one pitch apart in (n, h, w) order,
    each a dense run of channels, with a 16-byte aligned base and pitch: a dense channels_last
    tensor (pitch C) or a channel slice of a wider one (pitch: the wider tensor's channels).
    None for any other layout."""
    n, c, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if (c > 1 and stride_c != 1) or t.data_ptr() % TMA_ALIGNMENT:
        return None
    pitch = None
    span = 1  # pixels covered by the dimensions inside this one
    for size, stride in ((w, stride_w), (h, stride_h), (n, stride_n)):
        if size > 1:
            pitch = pitch if pitch is not None else stride
            if stride != span * pitch:
                return None
        span *= size
    pitch = c if pitch is None else pitch  # one pixel: any pitch addresses it
    # A pitch under C would overlap the rows.
    return (n * h * w, pitch) if pitch >= c and pitch * t.element_size() % TMA_ALIGNMENT == 0 else None


def pixel_grid(t: torch.Tensor):
    """(n, h, w) strides of a 4-D tensor as a tensor map reads it, or None where one cannot: the
    channels a dense run (unit stride), the base and every pixel stride on the 16-byte grid, and
    the pixel strides nested, each at least the span of the dimensions inside it (the elements
    from the first of them to one past the last: w's at least the channel run, h's at least a row
    of pixels, n's at least an image), so that no two pixels overlap (broadcast and overlapping
    views are refused; strided views, whose spans have gaps, are not). A size-1 dimension, whose
    coordinate is always 0, gets the stride it would have in a dense tensor: the next inner stride
    times its extent (aligned, and at least the span)."""
    n, c, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if (c > 1 and stride_c != 1) or t.data_ptr() % TMA_ALIGNMENT:
        return None
    strides, span, dense, element_size = [], c, c, t.element_size()
    for extent, stride in ((w, stride_w), (h, stride_h), (n, stride_n)):
        stride = stride if extent > 1 else dense
        if stride < span or stride * element_size % TMA_ALIGNMENT:
            return None
        strides.append(stride)
        span += stride * (extent - 1)
        dense = stride * extent
    return tuple(reversed(strides))
