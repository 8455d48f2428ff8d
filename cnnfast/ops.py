"""The public functional ops. Each is a torch custom op (namespace `cnnfast`) with a fake
implementation, so `torch.compile(fullgraph=True)` traces it; the wrapper checks its inputs and
picks a backend, the launcher allocates the output and runs the kernel on the current stream.
"""
import torch

from cnnfast.backends import cuda_extension, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The integer codes of kernels/cuda/dtype.h.
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: {name} requires grad, but cnnfast ops have no backward; "
            "run under torch.no_grad() or torch.inference_mode()"
        )


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


@torch.library.custom_op("cnnfast::global_avg_pool", mutates_args=())
def _global_avg_pool_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return _global_avg_pool_cuda(x)
    return torch.mean(x, dim=(2, 3))


@_global_avg_pool_op.register_fake
def _(x, backend):
    return x.new_empty((x.shape[0], x.shape[1]))


def global_avg_pool(x: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Mean over H and W of an (N, C, H, W) tensor -> (N, C) in x's dtype, accumulated in float32.

    Any strides are accepted (channels_last is the fast path). NaN and Inf propagate as in
    `torch.mean`. backend: "torch", "cuda", or None for the default of x's device.
    """
    op = "global_avg_pool"
    check_float_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: H and W must be non-empty, got H={x.shape[2]}, W={x.shape[3]}")
    return _global_avg_pool_op(x, resolve_backend(op, x, backend))
