"""Compiles the conv kernel for Hopper (sm_90a) without a GPU: every Hopper autotune config (split-K ones too), both
reduction orders (the channel-blocked one with and without a partial channel block), each dtype
(float32 as TF32, and as IEEE float32 the tiles the autotuner keeps for it). Then triton's bundled
ptxas checks each kernel for register spills, and the float16/bfloat16 kernels are checked for wgmma, Hopper's tensor-core MMA.

conftest sets TRITON_INTERPRET=1, under which triton does not compile, so the compiles run in one
subprocess per (dtype, problem), all at once, each running this file as a script without that variable.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget

from cnnfast.triton_kernels import conv2d as conv2d_module
from cnnfast.triton_kernels.conv2d import (
    config_name, conv2d_configs, pipeline_shared_memory, precision_keeps, split_k_configs,
)

# float32 runs as TF32 by default; "float32-ieee" with TF32 off, where the autotuner leaves out the
# tiles that spill (precision_keeps): compiled on the channel-blocked order with a partial channel
# block, where 9 of its 14 tiles spill (IEEE kernels compile slowly; the flat order's kept tiles were
# compiled without spills once, under triton 3.6 and 3.8, on 2026-12-01).
DTYPES = ("float16", "bfloat16", "float32", "float32-ieee")
IEEE_PROBLEMS = ("channel_blocked_masked",)
COMPILE_TIMEOUT_S = 600
HOPPER_SHARED_MEMORY = 227 * 1024  # bytes one block may opt in to on an H100/H200


def hopper_configs(problem: str):
    """The autotuning set of the problem's reduction order, split-K candidates included."""
    flat = problem == "flat"
    return conv2d_configs(flat=flat, interpreted=False) + split_k_configs(flat=flat, interpreted=False)


# ---------------------------------------------------------------- the subprocess side


# name: (C, K, H = W, kernel, stride, padding) of a representative layer for each reduction order.
PROBLEMS = {
    "flat": (3, 64, 32, 7, 2, 3),  # a 7x7 stride-2 stem on 3 channels
    "channel_blocked": (256, 256, 14, 3, 1, 1),  # a ResNet 3x3 conv: every block of channels full
    "channel_blocked_masked": (144, 288, 14, 3, 1, 1),  # GoogLeNet's 144 -> 288: a partial last block
}


def variants():
    """(dtype, problem) pairs compiled: every dtype on every problem, IEEE float32 on IEEE_PROBLEMS."""
    return [(dtype, problem) for dtype in DTYPES for problem in PROBLEMS
            if not dtype.endswith("-ieee") or problem in IEEE_PROBLEMS]


def recorded_launch(dtype_name: str, problem: str, config):
    """The arguments the launcher passes to the kernel for one of PROBLEMS, with channels_last
    tensors, a float32 bias, a residual and ReLU (the heaviest epilogue). The kernel's `run` is
    swapped for a recorder, so nothing runs; only the values' specialization matters."""
    dtype, channels_last = getattr(torch, dtype_name), torch.channels_last
    c, k, size, kernel, stride, padding = PROBLEMS[problem]
    assert conv2d_module.use_flat_reduction(c) == (problem == "flat")
    out_size = (size + 2 * padding - kernel) // stride + 1
    x = torch.empty(8, c, size, size, dtype=dtype).contiguous(memory_format=channels_last)
    weight = torch.empty(k, c, kernel, kernel, dtype=dtype).contiguous(memory_format=channels_last)
    out = torch.empty(8, k, out_size, out_size, dtype=dtype).contiguous(memory_format=channels_last)
    kernel_fn, launches = conv2d_module.conv2d_bias_act_kernel, []
    kernel_fn.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    try:
        conv2d_module.conv2d_bias_act(x, weight, torch.empty(k), torch.empty_like(out), out, (stride, stride),
                               (padding, padding), (1, 1), True, config=config)
    finally:
        del kernel_fn.run
    (args, kwargs), = launches
    return kernel_fn, args, kwargs


def compile_for_hopper(kernel_fn, args, kwargs):
    """triton.compile with the signature, constexprs and attributes the JIT would derive from these
    arguments on a GPU (ints equal to 1 become constants, multiples of 16 get a divisibility hint)."""
    names = [param.name for param in kernel_fn.params]
    values = dict(zip(names, args)) | {name: value for name, value in kwargs.items() if name in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel_fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif isinstance(attr, str):
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    options = {name: value for name, value in kwargs.items() if name not in names}
    source = triton.compiler.ASTSource(fn=kernel_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from triton's bundled ptxas, -arch=sm_90a -v --warn-on-spills."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", "--warn-on-spills", source, "-o", source + ".cubin"],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return {"spill_stores": int(spills[1]), "spill_loads": int(spills[2]), "registers": int(registers[1]),
            "ptxas_log": log}


def compile_problem(variant: str, problem: str) -> list[dict]:
    """One report per Hopper config: registers, spills, shared memory, wgmma (or the error)."""
    dtype_name, ieee = variant.removesuffix("-ieee"), variant.endswith("-ieee")
    torch.backends.cudnn.allow_tf32 = not ieee
    reports = []
    for config in hopper_configs(problem):
        report = {"dtype": variant, "problem": problem, "config": config_name(config)}
        shared_estimate = pipeline_shared_memory(config, getattr(torch, dtype_name).itemsize)
        if shared_estimate > HOPPER_SHARED_MEMORY:  # the autotuner prunes it on Hopper: it never runs
            reports.append(report | {"pruned": f"needs {shared_estimate} bytes of shared memory, more than "
                                               f"{HOPPER_SHARED_MEMORY}"})
            continue
        try:
            kernel_fn, args, kwargs = recorded_launch(dtype_name, problem, config)
            # The autotuner's pruning, on the precision the launcher passes.
            if not precision_keeps(config, getattr(torch, dtype_name), kwargs["INPUT_PRECISION"]):
                reports.append(report | {"pruned": "a tile that spills in IEEE float32"})
                continue
            kernel = compile_for_hopper(kernel_fn, args, kwargs)
            ptx = kernel.asm["ptx"]
            report |= ptxas_report(ptx) | {"wgmma": "wgmma.mma_async" in ptx, "shared": kernel.metadata.shared,
                                           "input_precision": kwargs["INPUT_PRECISION"]}
        except Exception as error:  # reported per config by the test
            report["error"] = f"{type(error).__name__}: {error}"
        reports.append(report)
    return reports


# ---------------------------------------------------------------- the test side


def compile_in_subprocesses(script: str, argument_lists, timeout_s: int = COMPILE_TIMEOUT_S) -> dict:
    """Runs `python script *arguments` for each argument tuple, all at once, without TRITON_INTERPRET
    (conftest sets it, and under it triton does not compile); returns each run's last stdout line,
    parsed as JSON, by argument tuple."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])  # the scripts import tests.*
    processes = {
        arguments: subprocess.Popen([sys.executable, script, *arguments], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        for arguments in argument_lists
    }
    outputs = {}
    for arguments, process in processes.items():
        stdout, stderr = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, f"compiling {' '.join(arguments)} failed:\n{stderr[-4000:]}"
        outputs[arguments] = json.loads(stdout.splitlines()[-1])
    return outputs


@pytest.fixture(scope="module")
def reports():
    """Every (dtype, problem, config) report, from one subprocess per (dtype, problem), all at once."""
    found = {}
    outputs = compile_in_subprocesses(__file__, variants())
    for output in outputs.values():
        for report in output:
            found[(report["dtype"], report["problem"], report["config"])] = report
    return found


@pytest.mark.parametrize(
    "dtype, problem, config",
    [pytest.param(dtype, problem, config, id=f"{dtype}-{problem}-{config_name(config)}")
     for dtype, problem in variants() for config in hopper_configs(problem)],
)
def test_compiles_for_hopper_without_spills(reports, dtype, problem, config):
    """Each config the autotuner keeps on Hopper compiles, fits the shared memory, and spills no register."""
    report = reports[(dtype, problem, config_name(config))]
    assert "error" not in report, report["error"]
    if "pruned" in report:
        pytest.skip(f"pruned on Hopper: {report['pruned']}")
    if dtype.startswith("float32"):
        assert report["input_precision"] == ("ieee" if dtype.endswith("-ieee") else "tf32")
    assert report["shared"] <= HOPPER_SHARED_MEMORY, "the pruning estimate let through a kernel that cannot launch"
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (
        f"{dtype} {problem} {config_name(config)} spills: {report['spill_stores']} bytes stored, "
        f"{report['spill_loads']} loaded\n{report['ptxas_log']}"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_kernels_use_wgmma(reports, dtype):
    """Every config issues wgmma: every tile is at least 64 rows by 4 warps, Hopper's warpgroup MMA shape."""
    entries = [report for key, report in reports.items() if key[0] == dtype and "wgmma" in report]
    without = [f"{report['problem']} {report['config']}" for report in entries if not report["wgmma"]]
    assert entries and not without, f"{dtype}: no wgmma in {', '.join(without)}"


if __name__ == "__main__":
    print(json.dumps(compile_problem(sys.argv[1], sys.argv[2])))
