"""cnnfast: fused convolution, residual and pooling kernels for the classic CNNs.

Submodules load on first use, so `import cnnfast` stays cheap (the CLI's `analyze` never loads
Triton or the CUDA extension).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("analysis", "models", "nn", "ops")


def __getattr__(name):
    if name == "optimize":
        from cnnfast.convert import optimize

        return optimize
    if name in _SUBMODULES:
        return importlib.import_module(f"cnnfast.{name}")
    raise AttributeError(f"module 'cnnfast' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES, "optimize"])
