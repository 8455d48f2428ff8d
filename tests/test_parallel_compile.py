"""The conv launchers compile their autotuning candidates in parallel before the autotuner times them
(cnnfast.triton_kernels.parallel_compile), checked without a GPU: the launchers and Triton's real
autotuner run on CPU tensors against a stand-in driver that compiles for sm_90a and launches
nothing. Every candidate must be compiled on the pool's threads, and the autotuner's own launches
must find each one compiled (no compile on the calling thread): for the implicit GEMM, and for the
1x1 layers' TMA kernel, whose configs set their descriptors' block shapes in a pre-hook (which the
pool's compiles must run too, or they would compile other specializations).

conftest sets TRITON_INTERPRET=1, under which triton does not compile, so the check runs in a
subprocess, this file as a script without that variable (as tests/test_triton_compile.py does).
"""
import json
import sys
import tempfile
import threading

import pytest

from tests.test_triton_compile import compile_in_subprocesses

TIMEOUT_S = 600


class StandInDriver:
    """The parts of Triton's active driver that compiling and launching use: an sm_90a target, and a
    launcher that does nothing."""

    class utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return None, None, 0, 0, 1024

    @staticmethod
    def launcher_cls(src, metadata):
        return lambda *args: None

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def tuning_reports(dtype_name: str) -> dict:
    """Runs the launcher's tuning call in three situations and reports, for each, where the compiles
    ran and how many configs the autotuner timed."""
    import torch
    import triton.compiler
    from triton.runtime.driver import driver

    driver.set_active(StandInDriver())
    from cnnfast.triton_kernels import conv2d

    from cnnfast.triton_kernels import conv2d_pointwise

    # The real ones ask the GPU for its shared memory.
    conv2d.config_fits = lambda config, dtype, device: True
    conv2d_pointwise.fits = lambda config, x, has_residual: True
    timed, compiles, fail_next_pool_compile = [], [], []
    implicit_gemm_tuners = [conv2d.autotuner_for(torch.device("cpu"), flat, split)
                            for flat in (False, True) for split in (False, True)]
    for tuner in [*implicit_gemm_tuners, conv2d_pointwise.autotuned]:
        tuner.configs = tuner.configs[:3]  # three candidates show the mechanism; each compile takes seconds
        tuner.do_bench = lambda kernel_call, quantiles: timed.append(kernel_call()) or [1.0, 1.0, 1.0]
    real_compile = triton.compiler.compile

    def recording_compile(*args, **kwargs):
        on_main = threading.current_thread() is threading.main_thread()
        compiles.append(on_main)
        if not on_main and fail_next_pool_compile:
            fail_next_pool_compile.clear()
            raise RuntimeError("a compile that fails once")
        return real_compile(*args, **kwargs)

    triton.compiler.compile = recording_compile  # the jit function takes it at its first launch
    dtype = getattr(torch, dtype_name)

    def tune(kernel_size, padding, pointwise=False, relu=True):
        """A 64-channel layer on a 14x14 map, on the implicit GEMM or (1x1) the TMA kernel."""
        out_size = 14 + 2 * padding - kernel_size + 1
        x = torch.randn(4, 64, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(64, 64, kernel_size, kernel_size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = torch.empty(4, 64, out_size, out_size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        timed.clear()
        compiles.clear()
        if pointwise:
            conv2d_pointwise.launch(x, weight, torch.randn(64), None, out, (1, 1), (0, 0), (1, 1), relu)
        else:
            conv2d.implicit_gemm(x, weight, torch.randn(64), None, out, (1, 1), (padding, padding), (1, 1), relu)
        return {"timed": len(timed), "compiles_on_main_thread": sum(compiles),
                "compiles_on_pool": len(compiles) - sum(compiles)}

    return {
        "candidates": len(implicit_gemm_tuners[0].configs),
        "pointwise_candidates": len(conv2d_pointwise.autotuned.configs),
        "pointwise_new_problem": tune(1, padding=0, pointwise=True),
        "new_problem": tune(3, padding=1),
        # The same autotuner key (it leaves out the ReLU): it runs its choice, compiled for the new
        # specialization; nothing is timed, so nothing should be compiled ahead.
        "tuner_already_chose": tune(3, padding=1, relu=False),
        # A new key (1x1), and a compile on the pool fails: the autotuner must compile that config
        # again, not reuse the failure.
        "a_pool_compile_fails": fail_next_pool_compile.append(True) or tune(1, padding=0),
    }


# bfloat16 alone: the pool's compiles take the launch's arguments whatever their dtype, and it is a
# dtype both kernels take (each case compiles some 13 kernels).
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_candidates_compile_on_the_pool_and_the_autotuner_finds_them_compiled(dtype):
    (report,) = compile_in_subprocesses(__file__, [(dtype,)], TIMEOUT_S).values()
    candidates = report["candidates"]
    assert candidates >= 2
    assert report["new_problem"] == {"timed": candidates, "compiles_on_pool": candidates, "compiles_on_main_thread": 0}
    assert report["tuner_already_chose"] == {"timed": 0, "compiles_on_pool": 0, "compiles_on_main_thread": 1}
    assert report["a_pool_compile_fails"] == {"timed": candidates, "compiles_on_pool": candidates,
                                              "compiles_on_main_thread": 1}
    pointwise = report["pointwise_candidates"]
    assert pointwise >= 2
    assert report["pointwise_new_problem"] == {"timed": pointwise, "compiles_on_pool": pointwise,
                                               "compiles_on_main_thread": 0}


if __name__ == "__main__":
    import os

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # compile afresh, not from an earlier run's cache
    os.environ.pop("TRITON_CACHE_AUTOTUNING", None)
    print(json.dumps(tuning_reports(sys.argv[1])))


def test_tuning_while_a_cuda_graph_is_captured_is_refused_with_what_to_do(monkeypatch):
    """Timing configs synchronizes, which a CUDA graph capture forbids: where the autotuner would
    tune, the launcher says to run once first; where it holds a choice, the launch goes ahead."""
    import torch

    from cnnfast.triton_kernels import add_relu, parallel_compile

    x = torch.zeros(2, 8, 3, 3)
    kernel, tuner, arguments, grid, flags = add_relu.launch_plan(x, x, torch.empty_like(x), True, None)
    args = arguments(torch.empty_like(x))
    cuda = torch.device("cuda")
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "configs", tuner.configs * 2)  # the interpreter's set may hold one: nothing to tune
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="add_relu: the Triton kernel for this shape has not been tuned yet"):
        parallel_compile.check_tuned_if_capturing("add_relu", cuda, tuner, args, flags)
    parallel_compile.check_tuned_if_capturing("add_relu", torch.device("cpu"), tuner, args, flags)  # the interpreter
    key = [value for name, value in zip(tuner.arg_names, args) if name in tuner.keys]
    tuner.cache[tuple(key + [str(value.dtype) for value in args if hasattr(value, "dtype")])] = tuner.configs[0]
    assert parallel_compile.autotuner_has_choice(tuner, args, flags)
    parallel_compile.check_tuned_if_capturing("add_relu", cuda, tuner, args, flags)
    tuner.cache.clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    parallel_compile.check_tuned_if_capturing("add_relu", cuda, tuner, args, flags)
