"""Every Hopper autotune config of the persistent TMA kernel of 1x1 convs (conv2d_pointwise.py)
compiles for sm_90a in float16 and bfloat16, with and without a residual: no register spill
(triton's bundled ptxas, as tests/test_triton_compile.py checks the implicit GEMM), wgmma and TMA
loads (cp.async.bulk.tensor) in the PTX, and the autotuner's shared-memory estimate covers what the
compiled kernel takes, so that its pruning never lets through a kernel that cannot launch.

The compiles run in one subprocess per dtype (conftest sets TRITON_INTERPRET=1, under which triton
does not compile), each running this file as a script without that variable.
"""
import json
import sys

import pytest
import torch

from cnnfast.triton_kernels import conv2d_pointwise
from tests.test_int64_indexing import recorded
from tests.test_triton_compile import compile_for_hopper, compile_in_subprocesses, ptxas_report

DTYPES = ("float16", "bfloat16")
CONFIGS = conv2d_pointwise.conv2d_pointwise_configs(interpreted=False)
HOPPER_SHARED_MEMORY = 227 * 1024  # bytes one block may opt in to on an H100/H200


def compile_dtype(dtype_name: str) -> list[dict]:
    """A report per (config, residual): registers, spills, shared memory (estimated and compiled),
    wgmma and TMA, for ResNet-50's layer3 expand conv (256 -> 1024 channels, 14x14) at batch 8."""
    dtype, reports = getattr(torch, dtype_name), []
    for index, config in enumerate(CONFIGS):
        for residual in (False, True):
            x = torch.empty(8, 256, 14, 14, dtype=dtype, memory_format=torch.channels_last)
            weight = torch.empty(1024, 256, 1, 1, dtype=dtype)
            out = torch.empty(8, 1024, 14, 14, dtype=dtype, memory_format=torch.channels_last)
            res = torch.empty_like(out) if residual else None
            launch = recorded(conv2d_pointwise.conv2d_pointwise_kernel, lambda: conv2d_pointwise.launch(
                x, weight, torch.empty(1024), res, out, (1, 1), (0, 0), (1, 1), True, config=config))
            kernel = compile_for_hopper(*launch)
            ptx = kernel.asm["ptx"]
            reports.append(ptxas_report(ptx) | {
                "index": index, "residual": residual, "shared": kernel.metadata.shared,
                "estimate": conv2d_pointwise.shared_memory(config, dtype.itemsize, residual),
                "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx})
    return reports


@pytest.fixture(scope="module")
def reports():
    outputs = compile_in_subprocesses(__file__, [(dtype,) for dtype in DTYPES])
    return {(dtype, report["index"], report["residual"]): report for (dtype,), output in outputs.items() for report in output}


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[conv2d_pointwise.config_name(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiles_for_hopper_with_wgmma_and_tma_without_spills(reports, dtype, index, residual):
    report = reports[(dtype, index, residual)]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["ptxas_log"]
    assert report["wgmma"] and report["tma"]
    # The estimate covers the kernel, within the 2 KB it keeps beyond the tiles.
    assert report["shared"] <= report["estimate"] < report["shared"] + 2048
    if report["estimate"] > HOPPER_SHARED_MEMORY:  # pruned on Hopper: it never launches
        assert (index, residual) == (0, True), "only the 128x256 tile with a residual is expected not to fit"


if __name__ == "__main__":
    print(json.dumps(compile_dtype(sys.argv[1])))
