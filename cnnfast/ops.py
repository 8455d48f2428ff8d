"""The public functional ops. Each is a torch.library op (namespace `cnnfast`) with a fake
implementation, so `torch.compile(fullgraph=True)` traces it; the wrapper checks its inputs and
the backend asked for, the op's kernel runs that backend (for backend=None, "auto", the default
for its real tensors), and the launcher allocates the output and runs the kernel on the current
stream. The registered op checks its arguments as the wrapper does, for calls that reach it
without the wrapper's checks (torch.ops.cnnfast.*, a compiled graph).
"""
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from cnnfast.backends import AUTO, cuda_extension, resolve_backend
from cnnfast.layout import pixel_rows
from cnnfast.precision import tf32_allowed
from cnnfast.tuning import epilogue_name

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The integer codes of kernels/cuda/dtype.h.
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# The ops' library. Each op is defined by its schema and registered with PyTorch's dispatcher
# directly: one kernel for every device (CompositeExplicitAutograd), which checks its arguments as
# the public function does, and a fake one for tracing.
# torch.library.custom_op would wrap each call in about 20 us of Python (autograd and aliasing
# checks, measured on a 2-core CPU), as long as a small layer's kernel; the kernels refuse inputs
# that require grad themselves (check_no_grad), and return new tensors or bump out's version.
LIBRARY = torch.library.Library("cnnfast", "DEF")


class Op:
    """A cnnfast op as the public functions call it, once they have checked its arguments: through
    its dispatcher overload where dispatcher_needed says so, else its kernel directly."""

    def __init__(self, overload, kernel):
        self.overload, self.kernel = overload, kernel

    def __call__(self, *args):
        return self.overload(*args) if dispatcher_needed(*args) else self.kernel(*args)


def define_op(schema: str, kernel, fake, check) -> Op:
    """Defines cnnfast::<name> by its schema, with kernel and fake. The dispatcher runs check (the
    public function's checks, on the op's own arguments) before kernel, so that a call of
    torch.ops.cnnfast.<name>, and a compiled graph's, gets the public function's errors where a
    kernel would read out of bounds or run a backend that was not asked for."""
    name = schema.split("(", 1)[0]
    kernel = _without_autocast(kernel)

    def checked_kernel(*args):
        check(*args)
        return kernel(*args)

    def checked_fake(*args):  # meta tensors, FakeTensorMode and compiled graphs get the same errors
        check(*args)
        return fake(*args)

    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    LIBRARY.impl(name, checked_kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"cnnfast::{name}", checked_fake, lib=LIBRARY)
    return Op(getattr(torch.ops.cnnfast, name).default, kernel)


# backend=None reaches the registered ops as AUTO: the default is chosen when the op's kernel runs,
# from the real tensors, not when a call is traced, so that a compiled graph or an exported
# program keeps its batch (and H, W) dynamic, and a CUDA graph keeps the choice made at capture.
def requested_backend(op: str, x: torch.Tensor, backend) -> str:
    """The backend argument of op's registered op: AUTO for None (or AUTO itself, which the
    registered op's checks pass on), else backend, checked against x."""
    return AUTO if backend is None or backend == AUTO else resolve_backend(op, x, backend)


def running_backend(op: str, x: torch.Tensor, backend: str, layer: tuple | None = None) -> str:
    """The backend op's kernel runs: backend itself, or for AUTO the default for x (cnnfast.tuning)."""
    return resolve_backend(op, x, None, layer) if backend == AUTO else backend


def _without_autocast(kernel):
    """kernel, run with autocast off: an op computes in its inputs' dtypes, as a compiled kernel
    does. Inside the torch backends autocast would change the dtype PyTorch's ops compute in, and
    with it the result's, one way for channels_last input and another for NCHW. (The dispatcher
    passes autocast through to ops it has no autocast kernel for.)"""
    def run(x, *args):
        if not autocast_enabled(x):
            return kernel(x, *args)
        with torch.autocast(x.device.type, enabled=False):
            return kernel(x, *args)

    return run


def autocast_enabled(t: torch.Tensor) -> bool:
    """Whether torch.autocast is on for t's device (a device autocast does not know, meta say, never)."""
    return torch.amp.is_autocast_available(t.device.type) and torch.is_autocast_enabled(t.device.type)


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def dispatcher_needed(*args) -> bool:
    """Whether a call must go through PyTorch's dispatcher: while torch.compile or torch.jit traces
    it, under a dispatch mode (FlopCounterMode, FakeTensorMode, make_fx) or a function mode (a
    `with torch.device(...)` block is one), a functorch transform or the profiler (whose trace then
    names the cnnfast op), with a tensor subclass, or with meta tensors (which the dispatcher
    sends to the op's fake implementation), or with a lazily negated view (z.conj().imag: its
    memory holds the values before the negation, which the dispatcher resolves). Otherwise the public functions call the op's kernel
    themselves: the dispatcher's boxed call of a Python kernel costs 7-20 us per call on a 2-core
    CPU, as long as a small layer's GPU kernel."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled()):
        return True
    for arg in args:
        # nn.Parameter disables __torch_function__: the fused modules' weights are plain tensors here.
        if isinstance(arg, torch.Tensor) and (type(arg) not in PLAIN_TENSOR_TYPES or arg.is_meta or arg.is_neg()):
            return True
    return False


OPTIONAL_TENSORS = frozenset({"bias", "residual", "out"})


def check_float_tensors(op: str, **tensors) -> None:
    """Each tensor given (None only for an absent optional one, OPTIONAL_TENSORS) is a torch.Tensor
    of a float dtype that does not require grad where grad is enabled, and all are on one device.
    One pass over them: the checks run on every call, and a small layer's kernel takes about as
    long as a few of them."""
    grad_enabled = torch.is_grad_enabled()
    device = None
    for name, t in tensors.items():
        if t is None and name in OPTIONAL_TENSORS:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: {name} has layout {t.layout}; the ops take dense (torch.strided) tensors")
        if grad_enabled and t.requires_grad:
            raise_requires_grad(op, name)
        if device is None:
            device = t.device
        elif t.device != device:
            listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
            raise RuntimeError(f"{op}: all tensors must be on one device, got {listing}")


def check_no_grad(op: str, **tensors) -> None:
    """Refuses inputs that require grad where grad is enabled: the ops have no backward. The public
    functions check first (check_float_tensors); each op's kernel checks again, for calls of
    torch.ops.cnnfast.* (the ops have no autograd kernel, whose absence would only warn at backward)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise_requires_grad(op, name)


def raise_requires_grad(op: str, name: str):
    raise RuntimeError(
        f"{op}: {name} requires grad, but cnnfast ops have no backward; run under torch.no_grad() or torch.inference_mode()"
    )


def as_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (a tuple or list; bools are not ints here), each at least `minimum`
    and at most 2^31-1 (what a kernel's 32-bit argument holds; larger ones reach no layer)."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if (len(pair) != 2 or not (isinstance(pair[0], int) and isinstance(pair[1], int))
            or isinstance(pair[0], bool) or isinstance(pair[1], bool)):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    if pair[0] > 2**31 - 1 or pair[1] > 2**31 - 1:
        raise ValueError(f"{op}: {name} must be at most 2^31-1, got {value!r}")
    return pair


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory, found by address, not by storage (two storages over
    one buffer, from torch.from_numpy or DLPack, share memory too): where the address ranges they
    span meet, they overlap unless they are views of one layout that keep apart (disjoint_views)."""
    if a.device.type == "meta" or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False

    def byte_range(t):
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1 and not disjoint_views(a, b)


def disjoint_views(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b provably share no element: both views with the same strides (those of
    dimensions longer than 1 in either) of one nested layout, each stride a multiple of the next
    smaller one, such as two channel slices of one tensor (reading one, writing the other, as a
    DenseNet block does). An address is then a mixed-radix number, one digit per dimension; each
    view covers a box of digits (no carries), and two boxes are apart where one digit's ranges are.
    False where this cannot be shown."""
    if a.element_size() != b.element_size() or a.dim() != b.dim():
        return False
    long = [i for i in range(a.dim()) if a.shape[i] > 1 or b.shape[i] > 1]
    if any(a.stride(i) != b.stride(i) for i in long):
        return False
    dims = [(a.stride(i), a.shape[i], b.shape[i]) for i in long]
    delta, remainder = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
    if remainder:
        return False
    if delta < 0:  # a at the lower address: every digit of b's offset is then >= 0
        delta, dims = -delta, [(stride, size_b, size_a) for stride, size_a, size_b in dims]
    dims.sort()
    strides = [stride for stride, _, _ in dims]
    if len(set(strides)) < len(strides) or (strides and strides[0] < 1):
        return False
    if any(larger % smaller for smaller, larger in zip(strides, strides[1:])):
        return False
    if strides and delta % strides[0]:
        return True  # b starts between a's elements, and so does each element of b
    apart = False
    for level in reversed(range(len(dims))):
        stride, size_low, size_high = dims[level]
        digit, delta = divmod(delta, stride)
        capacity = dims[level + 1][0] // stride if level + 1 < len(dims) else None
        if capacity is not None and (size_low > capacity or digit + size_high > capacity):
            return False  # a view that wraps into the next digit: not a box
        apart = apart or digit >= size_low
    return apart


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two of t's elements may share memory: with its dimensions ordered by stride, each
    stride must reach past everything the dimensions inside it span (conservative: an interleaving
    of dimensions that never collides is refused too)."""
    span = 1  # elements from the first to one past the last of the dimensions taken so far
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


# ---------------------------------------------------------------- fused convolution


def conv2d_output_size(op, x_shape, w_shape, stride, padding, dilation) -> tuple[int, int]:
    (h, w), (r, s) = x_shape[2:], w_shape[2:]
    extent_h, extent_w = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    if extent_h > h + 2 * padding[0] or extent_w > w + 2 * padding[1]:
        raise ValueError(
            f"{op}: kernel {r}x{s} (dilated extent {extent_h}x{extent_w}) is larger than the padded "
            f"input {h + 2 * padding[0]}x{w + 2 * padding[1]}"
        )
    return ((h + 2 * padding[0] - extent_h) // stride[0] + 1, (w + 2 * padding[1] - extent_w) // stride[1] + 1)


def _pointwise_gemm_operands(x, weight, residual, stride, padding, groups):
    """(x, weight, residual) as matrices when a conv is a plain matrix product: a 1x1 filter
    (whatever its dilation), stride 1, no padding, one group, x and residual dense channels_last
    ((N*H*W, C) and (N*H*W, K) views, no copy); else None. Float32 on a GPU stays on the
    convolution, whose TF32 setting is not the GEMM's (precision.tf32_allowed); on a CPU it takes
    the GEMM too, which PyTorch's CPU convolution is many times slower than for a fully connected
    layer run as a 1x1 conv (25088 -> 4096: 10x)."""
    pointwise = weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1
    dense = [t for t in (x, residual) if t is not None]
    gemm_dtype = x.dtype in (torch.float16, torch.bfloat16) or (x.dtype == torch.float32 and x.device.type == "cpu")
    if (not gemm_dtype or not pointwise
            or not all(t.is_contiguous(memory_format=torch.channels_last) for t in dense)):
        return None

    def rows(t):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    return rows(x), weight.reshape(weight.shape[0], -1), None if residual is None else rows(residual)


def _torch_convolution(x, weight, bias, stride, padding, dilation, groups):
    """F.conv2d with dilation 1 along a filter dimension of one tap, and stride 1 along an output
    dimension of one pixel (its first pixel kept), where they change nothing. PyTorch's CPU
    float16/bfloat16 channels_last convolution crashes or reads past its input with a filter one
    tap wide that is dilated, strided and padded along that dimension (seen on maps 1 and 2 wide),
    and its CPU bfloat16 convolution returns garbage or NaN for an output one pixel wide at a
    stride above 1 (any layout)."""
    one_tap = (weight.shape[2] == 1, weight.shape[3] == 1)
    dilation = tuple(1 if single else d for single, d in zip(one_tap, dilation))
    one_pixel = [False, False]
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:  # elsewhere the stride saves work: keep it
        one_pixel = [size == 1 for size in conv2d_output_size("conv2d", x.shape, weight.shape, stride, padding,
                                                              dilation)]
    if not any(one_pixel):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    stride = tuple(1 if single else s for single, s in zip(one_pixel, stride))
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return y[:, :, :1 if one_pixel[0] else None, :1 if one_pixel[1] else None]


def _conv2d_torch(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    """The layer on PyTorch's own ops, in x's dtype, each step rounding (the fused kernels round once).

    A 1x1 stride-1 conv on channels_last input (float16/bfloat16; on a CPU float32 too), as the
    bottleneck's reduce and expand layers and the fully connected layers run as 1x1 convs are, is
    one matrix product (cuBLAS on a GPU): addmm
    with the bias (cuBLASLt adds it in the GEMM's epilogue) or with the residual as the GEMM's C.
    Any other layer runs cuDNN's convolution (with the bias when it is in x's dtype), then adds a
    float32 bias to a half-precision result and the residual in place.
    ReLU is torch.relu_ (NaN stays NaN; cuBLASLt's ReLU epilogue is not used). No float32 copy of
    the output is made, so this stays at least as fast as eager PyTorch when backend=None picks it."""
    gemm = _pointwise_gemm_operands(x, weight, residual, stride, padding, groups)
    if gemm is not None:
        rows, weight2d, residual_rows = gemm
        if residual_rows is not None:
            y = torch.addmm(residual_rows, rows, weight2d.t())
        elif bias is not None:
            y = torch.addmm(bias.to(x.dtype), rows, weight2d.t())
        else:
            y = torch.mm(rows, weight2d.t())
        n, _, h, w = x.shape
        y = y.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)
        if residual_rows is not None and bias is not None:
            y.add_(bias.view(1, -1, 1, 1))
    else:
        # A bias in x's dtype rides in the convolution; a float32 one on a half-precision layer is
        # added after it, in float32, rounding once to x's dtype.
        fused_bias = bias is not None and bias.dtype == x.dtype
        y = _torch_convolution(x, weight, bias if fused_bias else None, stride, padding, dilation, groups)
        if bias is not None and not fused_bias:
            y.add_(bias.view(1, -1, 1, 1))
        if residual is not None:
            y.add_(residual)
    return y.relu_() if relu else y


def _conv2d_torch_triton(x, weight, bias, residual, out, stride, padding, dilation, groups, relu):
    """PyTorch's convolution without its bias (cuDNN's convolution, or for a 1x1 stride-1
    channels_last layer one matrix product, as in _conv2d_torch), then bias,
    residual and ReLU in one Triton pass (triton_kernels.add_relu) that reads the convolution's
    result once and writes the layer's output: in place over that result, or straight into `out`
    (a channel slice too) or a channels_last tensor when the result is not one. The torch backend
    spends up to three passes on the same epilogue, and rounds after each."""
    from cnnfast.triton_kernels.add_relu import add_relu as epilogue

    gemm = _pointwise_gemm_operands(x, weight, None, stride, padding, groups)
    if gemm is not None:
        rows, weight2d, _ = gemm
        n, _, h, w = x.shape
        y = torch.mm(rows, weight2d.t()).view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)
    else:
        y = _torch_convolution(x, weight, None, stride, padding, dilation, groups)
    if out is None:
        out = y if _is_channels_last_output(y) else torch.empty_like(y, memory_format=torch.channels_last)
    return epilogue(y, residual, out, relu, bias=bias)


def _conv2d_cudnn_fused(x, weight, bias, residual, stride, padding, dilation):
    """relu(conv2d(x, weight) + bias + residual) as one cuDNN operation graph (on PyTorch's default
    cuDNN v8 API path: the conv, then pointwise adds and the ReLU in float32, rounded once), the
    runtime fusion PyTorch reaches through torch.cudnn_convolution_relu / _add_relu; cuDNN picks
    the engine by its heuristics, or by timing them when torch.backends.cudnn.benchmark is set.
    The bias is given in x's dtype, the form PyTorch's own callers of these ops pass (a float32
    bias on a half-precision graph is not a combination PyTorch uses). The modules' float32 bias
    is rounded on every call: a kept copy would miss a write through `.data`, which moves no
    version counter."""
    bias = None if bias is None else bias.to(x.dtype)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    try:
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1)
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, 1)
    except RuntimeError as error:  # e.g. no cuDNN engine takes this fused graph
        raise RuntimeError(
            f"conv2d: backend 'cudnn_fused' could not run the layer (input {tuple(x.shape)} {x.dtype}, weight "
            f"{tuple(weight.shape)}, stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}, "
            f"residual {residual is not None}): {error}"
        ) from error


@torch.compiler.assume_constant_result
def cudnn_fused_refusal() -> str:
    """Why the user's cuDNN settings rule out cuDNN's fused convolution ("" when they do not): PyTorch's
    fused op runs whatever torch.backends.cudnn.enabled says and never asks for deterministic
    algorithms. A plain value, so that torch.compile takes it as a constant of the graph."""
    if not torch.backends.cudnn.enabled:
        return "torch.backends.cudnn.enabled is False"
    if torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are asked for, and PyTorch's fused cuDNN op does not select them"
    return ""


# The CUTLASS kernel reads channels in 16-byte TMA boxes: C and K in multiples of 8 elements.
CUTLASS_CHANNEL_MULTIPLE = 8


def _cutlass_channels(channels: int) -> int:
    """A channel count rounded up to the multiple the CUTLASS kernel runs with (zero-padded)."""
    return -(-channels // CUTLASS_CHANNEL_MULTIPLE) * CUTLASS_CHANNEL_MULTIPLE


def cuda_conv2d_kernel(dtype: torch.dtype, out_channels: int, kernel_size, stride, padding, relu: bool,
                       schedule: str = "auto") -> str:
    """The CUTLASS kernel the CUDA backend's convolution runs for this dtype, number of output
    channels (before the launcher pads them), (R, S), stride, padding and activation, by schedule and
    CTA tile: "cutlass-fprop-128x64x64" (the implicit-GEMM conv) or "cutlass-gemm-pingpong-128x128x64"
    (a 1x1 stride-1 ReLU layer as a GEMM). schedule "fprop" or "gemm-pingpong" forces one, as
    _conv2d_cuda's does. kernel_size, stride and padding: an int or a pair, as conv2d takes them."""
    op = "cuda_conv2d_kernel"
    kernel_size = as_pair(op, "kernel_size", kernel_size, 1)
    stride, padding = as_pair(op, "stride", stride, 1), as_pair(op, "padding", padding, 0)
    name, *tile = cuda_extension().conv2d_kernel(CUDA_DTYPE_CODES[dtype], _cutlass_channels(out_channels),
                                                 *kernel_size, padding, stride, relu, schedule)
    return f"cutlass-{name}-" + "x".join(map(str, tile))


def _dense_aligned(t: torch.Tensor) -> bool:
    """Dense (channels_last when 4-D) and 16-byte aligned, as the CUTLASS kernel reads its inputs."""
    layout = torch.channels_last if t.dim() == 4 else torch.contiguous_format
    return t.is_contiguous(memory_format=layout) and t.data_ptr() % 16 == 0


def _zero_padded(t: torch.Tensor, shape) -> torch.Tensor:
    """t as a dense, 16-byte aligned tensor of `shape` (each size >= t's; channels_last when 4-D):
    t in the leading corner, zeros elsewhere. t itself when it already is one."""
    same_shape = tuple(shape) == tuple(t.shape)
    if same_shape and _dense_aligned(t):
        return t
    layout = torch.channels_last if t.dim() == 4 else torch.contiguous_format
    dense = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)
    if not same_shape:
        dense.zero_()
    dense[tuple(slice(0, size) for size in t.shape)].copy_(t)
    return dense


def _cutlass_operands(x, weight, bias, residual, out):
    """The operands of the CUTLASS kernel: dense channels_last x, weight and residual, a float32
    bias, with C and K zero-padded to multiples of 8, and the output. Zero channels with zero
    filter taps add nothing to the sum and the padded output channels are never copied back, so
    the padding is exact; it is what runs the C=3 stems, at the cost of one copy of x. Returns
    (x, weight, bias, residual, kernel_out, pixel_stride): kernel_out is `out` when the kernel can
    write it in place (also a channel slice of a wider channels_last tensor: Inception's branches),
    otherwise a dense scratch tensor whose first K channels the caller copies into `out`."""
    (n, c, h, w), (k, _, r, s) = x.shape, weight.shape
    c_pad, k_pad = _cutlass_channels(c), _cutlass_channels(k)
    x = _zero_padded(x, (n, c_pad, h, w))
    weight = _zero_padded(weight, (k_pad, c_pad, r, s))
    bias = _zero_padded(bias.float(), (k_pad,)) if bias is not None else None
    out_shape = (n, k_pad, *out.shape[2:])
    residual = _zero_padded(residual, out_shape) if residual is not None else None
    rows = pixel_rows(out) if k_pad == k else None
    if rows is not None:
        return x, weight, bias, residual, out, rows[1]
    scratch = torch.empty(out_shape, dtype=out.dtype, device=out.device, memory_format=torch.channels_last)
    return x, weight, bias, residual, scratch, k_pad


def _conv2d_cuda(x, weight, bias, residual, out, stride, padding, dilation, relu, schedule="auto"):
    """The CUDA backend's launcher. schedule "auto" lets the extension pick its kernel
    (cuda_conv2d_kernel); "fprop" or "gemm-pingpong" force one, for measuring them against each other."""
    x, weight, bias, residual, kernel_out, pixel_stride = _cutlass_operands(x, weight, bias, residual, out)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    with torch.cuda.device(x.device):
        cuda_extension().conv2d(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0,
            residual.data_ptr() if residual is not None else 0, kernel_out.data_ptr(), pixel_stride,
            CUDA_DTYPE_CODES[x.dtype],
            n, c, h, w, k, r, s, tuple(padding), tuple(stride), tuple(dilation), relu,
            torch.cuda.current_stream(x.device).cuda_stream, schedule,
        )
    if kernel_out is not out:
        out.copy_(kernel_out[:, : out.shape[1]])


def _is_channels_last_output(y: torch.Tensor) -> bool:
    """Whether y has exactly the strides of the op's (fake) output: dense channels_last."""
    _, k, p, q = y.shape
    return y.stride() == (p * q * k, 1, q * k, k)


def _conv2d_dispatch(x, weight, bias, residual, out, stride, padding, dilation, groups, relu, backend):
    """Runs the layer on backend into out, or into a new channels_last tensor when out is None;
    returns the result."""
    if backend == "torch_triton":
        return _conv2d_torch_triton(x, weight, bias, residual, out, stride, padding, dilation, groups, relu)
    if backend in ("torch", "cudnn_fused"):
        if backend == "torch":
            y = _conv2d_torch(x, weight, bias, residual, stride, padding, dilation, groups, relu)
        else:
            y = _conv2d_cudnn_fused(x, weight, bias, residual, stride, padding, dilation)
        if out is not None:
            return out.copy_(y)
        # PyTorch's result is returned as is when it has the fake output's (channels_last) strides,
        # the usual case for channels_last input, else copied into that layout.
        return y if _is_channels_last_output(y) else _empty_conv2d_output(x, weight, stride, padding, dilation).copy_(y)
    if out is None:
        out = _empty_conv2d_output(x, weight, stride, padding, dilation)
    if backend == "triton":
        from cnnfast.triton_kernels.conv2d import conv2d_bias_act

        conv2d_bias_act(x, weight, bias, residual, out, stride, padding, dilation, relu)
    else:
        _conv2d_cuda(x, weight, bias, residual, out, stride, padding, dilation, relu)
    return out


def _empty_conv2d_output(x, weight, stride, padding, dilation):
    p, q = conv2d_output_size("conv2d", x.shape, weight.shape, stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], p, q)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _conv2d_running_backend(x, weight, residual, stride, padding, dilation, groups, relu, backend) -> str:
    """running_backend for a conv layer: for AUTO, the table's choice for its geometry, epilogue
    and batch, and torch where that choice cannot run the call."""
    if backend != AUTO:
        return backend
    layer = (tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
             epilogue_name(residual is not None, relu))
    chosen = running_backend("conv2d", x, AUTO, layer)
    if groups != 1 or conv2d_backend_refusal(x, groups, relu, chosen) is not None:
        # The table measured groups=1 layers (its key has C/groups channels: a grouped layer would
        # find a dense one's entry), float32 on CUTLASS as TF32, cuDNN's fused conv with a ReLU and
        # under its default settings: the rest stays on PyTorch's own ops.
        return "torch"
    return chosen


def _conv2d_out_kernel(x, weight, bias, residual, out, stride, padding, dilation, groups, relu, backend) -> None:
    operands = dict(x=x, weight=weight, bias=bias, residual=residual)
    check_no_grad("conv2d", **operands)
    # Checked here, on the tensors the kernel runs on: in a compiled graph those are only known at
    # run time (tracing sees fake ones), and inductor may have written out in place of a copy.
    for name, t in operands.items():
        if t is not None and overlaps(out, t):
            raise ValueError(f"conv2d: out overlaps {name}; the kernel needs a separate output")
    if overlaps_itself(out):
        raise ValueError(f"conv2d: out {tuple(out.shape)} with strides {out.stride()} has elements that share "
                         "memory (an expanded or overlapping view), so several outputs would land on one")
    if out.is_inference() and not torch.is_inference_mode_enabled():  # as PyTorch's in-place ops refuse
        raise RuntimeError("conv2d: out was made under torch.inference_mode() and can be written only inside it")
    backend = _conv2d_running_backend(x, weight, residual, stride, padding, dilation, groups, relu, backend)
    _conv2d_dispatch(x, weight, bias, residual, out, stride, padding, dilation, groups, relu, backend)
    # The Triton and CUDA kernels write through pointers: out's version moves as an in-place op's
    # would, so that autograd refuses a backward through what out held before.
    torch.autograd.graph.increment_version(out)


def _conv2d_kernel(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    check_no_grad("conv2d", x=x, weight=weight, bias=bias, residual=residual)
    backend = _conv2d_running_backend(x, weight, residual, stride, padding, dilation, groups, relu, backend)
    return _conv2d_dispatch(x, weight, bias, residual, None, stride, padding, dilation, groups, relu, backend)


def _conv2d_fake(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    return _empty_conv2d_output(x, weight, stride, padding, dilation)


def check_conv2d_inputs(x, weight, bias, residual, out, stride, padding, dilation, groups, relu):
    """conv2d's checks of its tensors and settings, whatever the backend; returns stride, padding
    and dilation as pairs."""
    op = "conv2d"
    check_float_tensors(op, x=x, weight=weight, bias=bias, residual=residual, out=out)
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) input, got {x.dim()}-D with shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (K, C, R, S) weight, got {weight.dim()}-D with shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    # PyTorch's own convolution answers these with a wrong shape or its own errors.
    if 0 in x.shape[1:]:
        raise ValueError(f"{op}: x {tuple(x.shape)} has an empty channel or spatial dimension (only the batch may be 0)")
    if 0 in weight.shape:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} has an empty dimension")
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {relu!r}")
    # Its memory holds the values before the negation (dynamo cannot ask; a compiled graph's out is its own).
    if out is not None and not torch.compiler.is_compiling() and out.is_neg():
        raise ValueError(f"{op}: out is a lazily negated view (its negative bit is set, as in z.conj().imag), "
                         "which the kernels cannot write through; pass a plain tensor")
    stride = as_pair(op, "stride", stride, 1)
    padding = as_pair(op, "padding", padding, 0)
    dilation = as_pair(op, "dilation", dilation, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    k = weight.shape[0]
    if x.shape[1] % groups or k % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels {x.shape[1]} and output channels {k}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"{op}: input has {x.shape[1]} channels, but weight {tuple(weight.shape)} with groups={groups} "
            f"expects {weight.shape[1] * groups}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != k):
        raise ValueError(f"{op}: bias must have shape ({k},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: bias dtype {bias.dtype} must be float32 or the input's {x.dtype}")
    p, q = conv2d_output_size(op, x.shape, weight.shape, stride, padding, dilation)
    out_shape = (x.shape[0], k, p, q)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and tuple(t.shape) != out_shape:
            raise ValueError(f"{op}: {name} must have the output's shape {out_shape}, got {tuple(t.shape)}")
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} differs from the input's {x.dtype}")
    return stride, padding, dilation


def conv2d_backend_refusal(x, groups, relu, backend) -> Exception | None:
    """The error to raise when backend cannot run this call, None when it can: a grouped conv off
    torch and torch_triton, cudnn_fused without ReLU or under cuDNN settings its op ignores, IEEE
    float32 on CUTLASS (which computes float32 as TF32)."""
    op = "conv2d"
    if groups != 1 and backend not in ("torch", "torch_triton"):
        return NotImplementedError(f"{op}: backend {backend!r} supports groups=1 only, got groups={groups}")
    if backend == "cudnn_fused" and not relu:
        return NotImplementedError(
            f"{op}: backend 'cudnn_fused' runs layers that end in a ReLU only (PyTorch exposes cuDNN's fused "
            "convolution with its ReLU); use backend='torch' for relu=False"
        )
    settings = cudnn_fused_refusal() if backend == "cudnn_fused" else ""
    if settings:
        return RuntimeError(f"{op}: backend 'cudnn_fused' cannot run here: {settings}")
    if backend == "cuda" and x.dtype == torch.float32 and not tf32_allowed("conv"):
        return NotImplementedError(
            f"{op}: backend 'cuda' (CUTLASS) computes float32 as TF32 only, and PyTorch's convolutions are set to "
            "IEEE float32 (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.conv.fp32_precision); "
            "use backend='triton' or 'torch' for IEEE float32"
        )
    return None


def _check_conv2d_call(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, out=None):
    """The dispatcher's checks of a conv2d call (and of conv2d_out's, with its out)."""
    check_conv2d_inputs(x, weight, bias, residual, out, stride, padding, dilation, groups, relu)
    if requested_backend("conv2d", x, backend) == AUTO:
        return
    refusal = conv2d_backend_refusal(x, groups, relu, backend)
    if refusal is not None:
        raise refusal


def _check_conv2d_out_call(x, weight, bias, residual, out, *settings):
    _check_conv2d_call(x, weight, bias, residual, *settings, out=out)


_CONV2D_OPERANDS = "Tensor x, Tensor weight, Tensor? bias, Tensor? residual"
_CONV2D_SETTINGS = "int[] stride, int[] padding, int[] dilation, int groups, bool relu, str backend"
_conv2d_out_op = define_op(f"conv2d_out({_CONV2D_OPERANDS}, Tensor(a!) out, {_CONV2D_SETTINGS}) -> ()",
                           _conv2d_out_kernel, lambda *args: None, _check_conv2d_out_call)
_conv2d_op = define_op(f"conv2d({_CONV2D_OPERANDS}, {_CONV2D_SETTINGS}) -> Tensor", _conv2d_kernel, _conv2d_fake,
                       _check_conv2d_call)


def conv2d_flops(x_shape, w_shape, stride, padding, dilation) -> int:
    """Two FLOPs per multiply-add, as FlopCounterMode counts aten.convolution."""
    p, q = conv2d_output_size("conv2d", x_shape, w_shape, stride, padding, dilation)
    return 2 * x_shape[0] * w_shape[0] * p * q * w_shape[1] * w_shape[2] * w_shape[3]


@register_flop_formula(torch.ops.cnnfast.conv2d)
def _(x_shape, w_shape, bias, residual, stride, padding, dilation, *args, out_shape=None, **kwargs):
    return conv2d_flops(x_shape, w_shape, stride, padding, dilation)


@register_flop_formula(torch.ops.cnnfast.conv2d_out)
def _(x_shape, w_shape, bias, residual, out, stride, padding, dilation, *args, out_shape=None, **kwargs):
    return conv2d_flops(x_shape, w_shape, stride, padding, dilation)


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=False,
           out=None, backend=None):
    """relu?(conv2d(x, weight) + bias + residual) in one kernel (triton, cuda).

    x: (N, C, H, W), any strides (channels_last is the fast path); weight: (K, C/groups, R, S) in
    x's dtype; bias: (K,), float32 or x's dtype (a folded BatchNorm's shift, see fold_bn);
    residual: (N, K, P, Q) in x's dtype. Accumulation is float32; the triton and cuda epilogues
    run in float32 and round once, torch_triton rounds the convolution's result and then once more
    after its epilogue, and the torch backend rounds after each of its steps.
    out: an (N, K, P, Q) tensor to write into, with any strides (a channel slice of a larger
    channels_last tensor works); otherwise a channels_last output is allocated.
    backend: "triton", "cuda" (CUTLASS: float16, bfloat16, and float32 as TF32 when PyTorch's
    convolutions may use TF32: torch.backends.cudnn.allow_tf32, or torch.backends.cudnn.conv.fp32_precision;
    C or K not a multiple of 8 is zero-padded to one,
    which costs a copy of x for C and a scratch output copied back for K, as does an `out` whose
    pixels are not 16-byte aligned), "torch_triton" (PyTorch's convolution, then bias, residual and
    ReLU in one Triton pass; any groups), "cudnn_fused" (cuDNN's fused conv + bias + residual + ReLU,
    CUDA tensors and relu=True only, not while cuDNN is disabled or deterministic algorithms are
    asked for; a float32 bias is rounded to x's dtype on every call, and `out` gets a copy
    of cuDNN's result),
    "torch", or None for the default of x's device (cnnfast.tuning),
    chosen when the kernel runs.
    """
    op = "conv2d"
    stride, padding, dilation = check_conv2d_inputs(x, weight, bias, residual, out, stride, padding, dilation, groups,
                                                    relu)
    backend = requested_backend(op, x, backend)
    refusal = None if backend == AUTO else conv2d_backend_refusal(x, groups, relu, backend)
    if refusal is not None:
        raise refusal
    if out is not None:
        _conv2d_out_op(x, weight, bias, residual, out, stride, padding, dilation, groups, relu, backend)
        return out
    return _conv2d_op(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)


def loaded_frozen_batch_norm():
    """torchvision's FrozenBatchNorm2d class where torchvision.ops is loaded, else None (and then no
    module is one): importing torchvision only to ask would take about a second."""
    misc = sys.modules.get("torchvision.ops.misc")
    return misc.FrozenBatchNorm2d if misc is not None else None


def fold_bn(conv_weight: torch.Tensor, conv_bias, bn, dtype=None):
    """Folds an eval-mode BatchNorm2d (or torchvision's FrozenBatchNorm2d, which has no training
    mode) into the convolution before it, in float32.

    Returns (weight, bias): weight rounded once to dtype (default: conv_weight's), bias in float32, such that
    conv2d(x, weight, bias) == bn(conv2d(x, conv_weight, conv_bias)).
    """
    frozen = loaded_frozen_batch_norm()
    if not (isinstance(bn, torch.nn.BatchNorm2d) or (frozen is not None and isinstance(bn, frozen))):
        raise TypeError(f"fold_bn: expected a BatchNorm2d or FrozenBatchNorm2d, got {type(bn).__name__}")
    problem = batch_norm_statistics_problem(bn)
    if problem:
        raise RuntimeError(f"fold_bn: {problem}")
    # Not check_float_tensors: a module's weight requires grad, and the fold is no op call.
    tensors = {"conv_weight": conv_weight, "conv_bias": conv_bias, "the BatchNorm's statistics": bn.running_mean}
    for name, t in tensors.items():
        if (t is not None or name == "conv_weight") and not (
                isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES + (torch.float64,)):
            raise TypeError(f"fold_bn: {name} must be a floating tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if len({t.device for t in tensors.values() if t is not None}) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
        raise RuntimeError(f"fold_bn: all tensors must be on one device, got {listing}")
    if conv_weight.dim() != 4:
        raise ValueError(f"fold_bn: expected a 4-D (K, C, R, S) conv weight, got shape {tuple(conv_weight.shape)}")
    if dtype is not None and dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"fold_bn: dtype must be a floating dtype (float32, float16, bfloat16, float64), got {dtype}")
    k, features = conv_weight.shape[0], bn.running_mean.numel()
    if features != k:
        raise ValueError(f"fold_bn: BatchNorm has {features} features, the convolution {k} output channels")
    if conv_bias is not None and tuple(conv_bias.shape) != (k,):
        raise ValueError(f"fold_bn: conv bias must have shape ({k},), got {tuple(conv_bias.shape)}")
    scale, shift = batch_norm_scale_shift(bn, conv_bias)
    with torch.no_grad():
        weight = (conv_weight.float() * scale.view(-1, 1, 1, 1)).to(dtype or conv_weight.dtype)
    return weight, shift


def batch_norm_statistics_problem(bn) -> str | None:
    """Why an eval-form BatchNorm's statistics cannot be folded as they stand, or None when they can."""
    if isinstance(bn, torch.nn.BatchNorm2d) and bn.training:
        return "the BatchNorm is in training mode; call .eval() first (its batch statistics change every step)"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm has no running statistics (track_running_stats=False)"
    return None


def batch_norm_scale_shift(bn, input_bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32, such that bn(y + input_bias) == y * scale + shift per channel."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:  # affine=False has no gamma and beta
            scale = scale * bn.weight.float()
        # (b - mean) first: the running mean tracks the conv bias, and the difference is then exact.
        centre = -bn.running_mean.float() if input_bias is None else input_bias.float() - bn.running_mean.float()
        shift = centre * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
    return scale, shift


# ---------------------------------------------------------------- global average pooling


def _global_avg_pool_cuda(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        cuda_extension().global_avg_pool(
            x.data_ptr(), out.data_ptr(), CUDA_DTYPE_CODES[x.dtype], n, c, h, w,
            *x.stride(), *out.stride(), torch.cuda.current_stream(x.device).cuda_stream,
        )
    return out


def _global_avg_pool_kernel(x: torch.Tensor, backend: str) -> torch.Tensor:
    check_no_grad("global_avg_pool", x=x)
    backend = running_backend("global_avg_pool", x, backend)
    if backend == "cuda":
        return _global_avg_pool_cuda(x)
    if backend == "triton":
        from cnnfast.triton_kernels.global_avg_pool import global_avg_pool as global_avg_pool_triton

        return global_avg_pool_triton(x)
    return torch.mean(x, dim=(2, 3))


def check_global_avg_pool_input(x) -> None:
    op = "global_avg_pool"
    check_float_tensors(op, x=x)
    check_poolable(op, x)


def _check_global_avg_pool_call(x, backend) -> None:
    check_global_avg_pool_input(x)
    requested_backend("global_avg_pool", x, backend)


_global_avg_pool_op = define_op(
    "global_avg_pool(Tensor x, str backend) -> Tensor", _global_avg_pool_kernel,
    lambda x, backend: x.new_empty((x.shape[0], x.shape[1])), _check_global_avg_pool_call,
)


def global_avg_pool(x: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Mean over H and W of an (N, C, H, W) tensor -> (N, C) in x's dtype, accumulated in float32.

    Any strides are accepted (channels_last is the fast path). NaN and Inf propagate as in
    `torch.mean`. backend: "triton", "cuda", "torch", or None for the
    default of x's device (cnnfast.tuning), chosen when the kernel runs.
    """
    check_global_avg_pool_input(x)
    return _global_avg_pool_op(x, requested_backend("global_avg_pool", x, backend))


def check_poolable(op: str, x: torch.Tensor) -> None:
    """A global pooling input: 4-D with a non-empty H x W."""
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: H and W must be non-empty, got H={x.shape[2]}, W={x.shape[3]}")


# ---------------------------------------------------------------- residual add + ReLU


def _empty_add_relu_output(x, y):
    # The flat (fast) kernel needs x, y and out in one dense layout: keep the one x and y share.
    for layout in (torch.channels_last, torch.contiguous_format):
        if x.is_contiguous(memory_format=layout) and y.is_contiguous(memory_format=layout):
            return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _add_relu_kernel(x: torch.Tensor, y: torch.Tensor, relu: bool, backend: str) -> torch.Tensor:
    check_no_grad("add_relu", x=x, y=y)
    backend = running_backend("add_relu", x, backend)
    out = _empty_add_relu_output(x, y)
    if backend == "triton":
        from cnnfast.triton_kernels.add_relu import add_relu as add_relu_triton

        return add_relu_triton(x, y, out, relu)
    if backend == "cuda":
        with torch.cuda.device(x.device):
            cuda_extension().add_relu(
                x.data_ptr(), y.data_ptr(), out.data_ptr(), CUDA_DTYPE_CODES[x.dtype], tuple(x.shape), x.stride(),
                y.stride(), out.stride(), relu, torch.cuda.current_stream(x.device).cuda_stream,
            )
        return out
    torch.add(x, y, out=out)
    return torch.relu_(out) if relu else out


def check_add_relu_inputs(x, y, relu) -> None:
    op = "add_relu"
    check_float_tensors(op, x=x, y=y)
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"{op}: x dtype {x.dtype} and y dtype {y.dtype} differ")
    if not isinstance(relu, bool):
        raise TypeError(f"{op}: relu must be a bool, got {relu!r}")


def _check_add_relu_call(x, y, relu, backend) -> None:
    check_add_relu_inputs(x, y, relu)
    requested_backend("add_relu", x, backend)


_add_relu_op = define_op(
    "add_relu(Tensor x, Tensor y, bool relu, str backend) -> Tensor", _add_relu_kernel,
    lambda x, y, relu, backend: _empty_add_relu_output(x, y), _check_add_relu_call,
)


def add_relu(x: torch.Tensor, y: torch.Tensor, relu: bool = True, *, backend=None) -> torch.Tensor:
    """relu(x + y) (or x + y with relu=False): the residual add of a ResNet block, in one pass.

    x and y: (N, C, H, W) of one shape and dtype, any strides. The sum is taken in float32 and
    rounded once to x's dtype; NaN propagates as in torch.relu. The output keeps the memory format
    x and y share when both are contiguous in one (channels_last or NCHW: the fast path), and is
    channels_last otherwise. backend: "triton", "cuda", "torch", or None for the
    default of x's device (cnnfast.tuning), chosen when the kernel runs.
    """
    check_add_relu_inputs(x, y, relu)
    return _add_relu_op(x, y, relu, requested_backend("add_relu", x, backend))


# ---------------------------------------------------------------- global average pooling + linear


def _gap_linear_cuda(x, weight, bias):
    n, c, h, w = x.shape
    o = weight.shape[0]
    weight = weight.contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    pooled = torch.empty((n, c), dtype=x.dtype, device=x.device)  # the kernel's scratch
    out = torch.empty((n, o), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        cuda_extension().gap_linear(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0, pooled.data_ptr(),
            out.data_ptr(), CUDA_DTYPE_CODES[x.dtype], n, c, h, w, o, *x.stride(),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return out


def _gap_linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    check_no_grad("gap_linear", x=x, weight=weight, bias=bias)
    backend = running_backend("gap_linear", x, backend)
    if backend == "cuda":
        return _gap_linear_cuda(x, weight, bias)
    if backend == "triton":
        from cnnfast.triton_kernels.gap_linear import gap_linear as gap_linear_triton

        return gap_linear_triton(x, weight, bias)
    # PyTorch's head, mean -> linear in x's dtype (a float32 bias is rounded to it).
    return F.linear(torch.mean(x, dim=(2, 3)), weight, None if bias is None else bias.to(x.dtype))


def check_gap_linear_inputs(x, weight, bias) -> None:
    op = "gap_linear"
    check_float_tensors(op, x=x, weight=weight, bias=bias)
    check_poolable(op, x)
    if weight.dim() != 2:
        raise ValueError(
            f"{op}: expected a 2-D (out_features, C) weight, got {weight.dim()}-D with shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: input has {x.shape[1]} channels, but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    out_features = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: bias dtype {bias.dtype} must be float32 or the input's {x.dtype}")


def _check_gap_linear_call(x, weight, bias, backend) -> None:
    check_gap_linear_inputs(x, weight, bias)
    requested_backend("gap_linear", x, backend)


_gap_linear_op = define_op(
    "gap_linear(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor", _gap_linear_kernel,
    lambda x, weight, bias, backend: x.new_empty((x.shape[0], weight.shape[0])), _check_gap_linear_call,
)


@register_flop_formula(torch.ops.cnnfast.gap_linear)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs):
    # The linear layer's 2 * N * C * out_features, as FlopCounterMode counts a matmul; the pooling's
    # N * C * H * W additions are not counted (nor are aten.mean's).
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


def gap_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, *, backend=None) -> torch.Tensor:
    """The classifier head linear(global_avg_pool(x), weight, bias) in one op: on the triton and
    cuda backends, a pooling kernel, then a GEMM kernel with the bias in its epilogue.

    x: (N, C, H, W), any strides; weight: (out_features, C) in x's dtype; bias: (out_features,),
    float32 or x's dtype. Returns (N, out_features) in x's dtype. The pooling accumulates in
    float32 and its result is rounded to x's dtype for the matrix product (as PyTorch's mean ->
    linear does), which accumulates in float32. FlopCounterMode counts the linear layer,
    2 * N * C * out_features. backend: "triton", "cuda", "torch", or None for the
    default of x's device (cnnfast.tuning), chosen when the kernel runs.
    """
    check_gap_linear_inputs(x, weight, bias)
    return _gap_linear_op(x, weight, bias, requested_backend("gap_linear", x, backend))
