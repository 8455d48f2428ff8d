"""Compiling a kernel's autotuning candidates in parallel, before the autotuner times them.

Triton's autotuner compiles each candidate config the first time it times it, one after another,
so the first call of a new problem waits for the sum of their compile times (seconds each for the
convolution kernel on sm_90a, most of it in ptxas). The compiles do not depend on one another:
Triton's AsyncCompileMode runs them on a thread pool (its compiler passes and ptxas run outside the
GIL) and files each compiled kernel in the JIT's cache under the key that the autotuner's own launch
of that config looks up, so the autotuner then only times them.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from triton.runtime._async_compile import AsyncCompileMode, FutureKernel
from triton.runtime.jit import JITFunction


def autotuner_choice(tuner, args, kwargs):
    """The config the autotuner holds for these launch arguments, or None when it has none yet (it
    would then time, and compile, its candidates). Its in-memory cache is keyed as Autotuner.run
    builds the key: the values of its key arguments, then the dtype of every argument that has one."""
    named = {name: value for name, value in {**dict(zip(tuner.arg_names, args)), **kwargs}.items()
             if name in tuner.arg_names}
    key = [named[name] for name in tuner.keys if name in named]
    key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
    return tuner.cache.get(tuple(key))


def autotuner_has_choice(tuner, args, kwargs) -> bool:
    """Whether the autotuner already holds a choice for these launch arguments."""
    return autotuner_choice(tuner, args, kwargs) is not None


def check_tuned_if_capturing(op: str, device, tuner, args, kwargs) -> None:
    """Raises a RuntimeError that says what to do where launching tuner would tune (time its
    configs, which synchronizes) while a CUDA graph is being captured on device's current stream:
    the capture would otherwise fail with CUDA's own "operation not permitted when stream is
    capturing". Call under torch.cuda.device(device)."""
    if (device.type == "cuda" and len(tuner.configs) > 1 and torch.cuda.is_current_stream_capturing()
            and not autotuner_has_choice(tuner, args, kwargs)):
        raise RuntimeError(
            f"{op}: the Triton kernel for this shape has not been tuned yet, and tuning cannot run while a CUDA "
            "graph is captured; run the model (or the op) once with these shapes before capturing it"
        )


def compile_in_parallel(kernel, configs, args, kwargs) -> None:
    """Compiles kernel (a jit function, or a triton.heuristics wrapper of one) for each of configs
    with the launch arguments args and kwargs, as many at once as this machine has cores. A config
    that fails to compile is left out of the JIT's cache: the autotuner compiles it again itself
    and, as usual, drops it if it is out of resources."""
    if not configs:
        return
    jit = kernel
    while not isinstance(jit, JITFunction):
        jit = jit.fn
    with ThreadPoolExecutor(min(len(configs), os.cpu_count() or 1)) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            if config.pre_hook is not None:  # as the autotuner runs it before a launch (a TMA block shape, say)
                config.pre_hook({**dict(zip(jit.arg_names, args)), **kwargs, **config.all_kwargs()})
            kernel.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
    # Some Triton versions (3.8) file the pending compile at once: one that failed would stay there
    # and raise its error at every later launch, instead of being compiled again.
    for kernel_cache, *_ in jit.device_caches.values():
        failed = [key for key, value in kernel_cache.items() if isinstance(value, FutureKernel) and value.kernel is None]
        for key in failed:
            del kernel_cache[key]
