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

from triton.runtime._async_compile import AsyncCompileMode


def compile_in_parallel(kernel, configs, args, kwargs) -> None:
    """Compiles kernel (a jit function, or a triton.heuristics wrapper of one) for each of configs
    with the launch arguments args and kwargs, as many at once as this machine has cores. A config
    that fails to compile is left out: the autotuner compiles it again itself and, as usual, drops
    it if it is out of resources."""
    if not configs:
        return
    with ThreadPoolExecutor(min(len(configs), os.cpu_count() or 1)) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            kernel.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
