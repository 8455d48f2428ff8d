"""Which backend runs an op: "triton" (cnnfast.triton_kernels), "cuda" (cnnfast._C), "torch"
(PyTorch's own ops: cuDNN and cuBLAS on a GPU, oneDNN on a CPU), and, for the convolution alone,
"torch_triton" (PyTorch's convolution, then bias + residual + ReLU in one Triton pass) and
"cudnn_fused" (cuDNN's runtime-fused convolution + bias + residual + ReLU, which PyTorch exposes
as torch.cudnn_convolution_relu and torch.cudnn_convolution_add_relu).

A backend the caller names either runs or raises; `None` picks the backend measured fastest for
the op on the tensor's GPU and dtype, and for a convolution its layer (cnnfast.tuning), "torch"
where nothing was measured.
"""
import functools
import os
import warnings

import torch

from cnnfast.tuning import default_backend

BACKENDS = ("torch", "triton", "cuda", "torch_triton", "cudnn_fused")
# backend=None as the registered ops (torch.ops.cnnfast.*) take it, and a synonym of None everywhere:
# the default, chosen when an op's kernel runs (cnnfast.ops.running_backend).
AUTO = "auto"
# The ops each backend has a kernel for, where it is not every op.
BACKEND_OPS = {"torch_triton": ("conv2d",), "cudnn_fused": ("conv2d",)}


def backends_of(op: str) -> tuple[str, ...]:
    """The backends that have a kernel for op (whether or not they can run on this machine)."""
    return tuple(backend for backend in BACKENDS if op in BACKEND_OPS.get(backend, (op,)))


# Read once: torch.compile cannot trace the query.
CUDNN_AVAILABLE = torch.backends.cudnn.is_available()
# Triton runs CPU tensors only under its interpreter (the tests' CPU path).
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:
    from cnnfast import _C as _cuda_extension

    _CUDA_IMPORT_ERROR = None
except ImportError as error:  # built with CNNFAST_BUILD_CUDA=0, or no nvcc at install time
    _cuda_extension = None
    _CUDA_IMPORT_ERROR = error


def cuda_extension():
    """The compiled module cnnfast._C, or a RuntimeError that says why it is missing."""
    if _cuda_extension is None:
        raise RuntimeError(
            "backend 'cuda' is not available: cnnfast._C failed to import "
            f"({_CUDA_IMPORT_ERROR}); reinstall with nvcc on the PATH or CUDA_HOME set"
        )
    return _cuda_extension


# Asked once, at import: resolve_backend checks it on every call, and torch.compile cannot trace
# into the extension's pybind11 query.
_CUDA_OPS = tuple(_cuda_extension.build_info()["ops"]) if _cuda_extension is not None else ()


def cuda_ops():
    """Names of the ops the compiled extension provides (empty when it is not built)."""
    return _CUDA_OPS


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def check_backend_name(where: str, backend) -> None:
    """Raises a ValueError naming `where` when backend is neither one of BACKENDS nor None (or AUTO)."""
    if backend is not None and backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {BACKENDS}, or None (or {AUTO!r}) "
                         "for the default")


def resolve_backend(op: str, x: torch.Tensor, backend, layer: tuple | None = None):
    """Checks an explicit backend against the op and the tensor, or picks the default (for a
    convolution, layer = (weight shape, stride, padding, dilation, epilogue name) selects its per-layer entry)."""
    if backend is None or backend == AUTO:
        chosen = default_backend(op, x, layer)
        if chosen not in backends_of(op):  # a foreign or hand-edited table: never an unchecked kernel
            warn_once(f"cnnfast: the tuning table names backend {chosen!r} for {op}, which has no such "
                      "kernel; running torch")
            return "torch"
        # A table measured with the CUDA extension, read where it is not built (or lacks the op).
        return "torch" if chosen == "cuda" and op not in cuda_ops() else chosen
    check_backend_name(op, backend)
    if backend == "cuda":
        cuda_extension()  # raises, saying why, when the extension is not built
        if op not in cuda_ops():
            raise NotImplementedError(f"{op}: backend 'cuda' has no kernel for this op")
    if backend not in backends_of(op):
        raise NotImplementedError(
            f"{op}: backend {backend!r} has no kernel for this op (it runs {', '.join(BACKEND_OPS[backend])} only)"
        )
    if x.device.type == "meta":  # shapes only (cnnfast.analysis): the op's fake implementation runs
        return backend
    if backend in ("cuda", "cudnn_fused") and x.device.type != "cuda":
        raise RuntimeError(f"{op}: backend {backend!r} needs CUDA tensors, got a tensor on {x.device}")
    if backend == "cudnn_fused" and not CUDNN_AVAILABLE:
        raise RuntimeError(f"{op}: backend 'cudnn_fused' needs cuDNN, which this PyTorch build lacks")
    if backend in ("triton", "torch_triton") and x.device.type != "cuda" and not TRITON_INTERPRETED:
        raise RuntimeError(
            f"{op}: backend {backend!r} needs CUDA tensors, got a tensor on {x.device} "
            "(CPU tensors run only under TRITON_INTERPRET=1)"
        )
    return backend
