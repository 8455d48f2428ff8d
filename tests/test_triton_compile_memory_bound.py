"""Every Hopper autotune config of the memory-bound Triton kernels (add_relu's flat and strided
kernels, the strided one also as torch_triton's conv epilogue, global_avg_pool, gap_linear's
product) compiles for sm_90a in each dtype without a register spill, checked with triton's
bundled ptxas as tests/test_triton_compile.py checks the conv kernel.

The compiles run in one subprocess per kernel (conftest sets TRITON_INTERPRET=1, under which
triton does not compile), each running this file as a script without that variable.
"""
import json
import sys

import pytest
import torch

from cnnfast.triton_kernels.add_relu import add_relu_flat_configs, add_relu_strided_configs
from cnnfast.triton_kernels.gap_linear import linear_bias_configs
from cnnfast.triton_kernels.global_avg_pool import global_avg_pool_configs
from tests.test_int64_indexing import (
    TIMEOUT_S, add_relu_launch, conv_epilogue_launch, global_avg_pool_launch, linear_bias_launch,
)
from tests.test_triton_compile import compile_for_hopper, compile_in_subprocesses, ptxas_report

DTYPES = ("float16", "bfloat16", "float32")
# name: (launch(config_index, dtype), the Hopper configs of a dtype name)
KERNELS = {
    "add_relu_flat": (lambda i, dtype: add_relu_launch(True, i, dtype), lambda dtype: add_relu_flat_configs(False)),
    "add_relu_strided": (lambda i, dtype: add_relu_launch(False, i, dtype), lambda dtype: add_relu_strided_configs(False)),
    "conv_epilogue": (conv_epilogue_launch, lambda dtype: add_relu_strided_configs(False)),
    "global_avg_pool": (global_avg_pool_launch, lambda dtype: global_avg_pool_configs(False)),
    "gap_linear_product": (linear_bias_launch, lambda dtype: linear_bias_configs(False, float32=dtype == "float32")),
}


def compile_kernel(name: str) -> list[dict]:
    """Spill counts of every config of one kernel, in every dtype."""
    launch, configs = KERNELS[name]
    reports = []
    for dtype in DTYPES:
        for index in range(len(configs(dtype))):
            kernel = compile_for_hopper(*launch(index, getattr(torch, dtype)))
            report = ptxas_report(kernel.asm["ptx"])
            reports.append({"dtype": dtype, "index": index, "spill_stores": report["spill_stores"],
                            "spill_loads": report["spill_loads"], "registers": report["registers"]})
    return reports


@pytest.fixture(scope="module")
def reports():
    outputs = compile_in_subprocesses(__file__, [(name,) for name in KERNELS], TIMEOUT_S)
    return {(name, report["dtype"], report["index"]): report for (name,), output in outputs.items() for report in output}


@pytest.mark.parametrize(
    "name, dtype, index",
    [(name, dtype, index) for name, (_, configs) in KERNELS.items() for dtype in DTYPES for index in range(len(configs(dtype)))],
)
def test_compiles_for_hopper_without_spills(reports, name, dtype, index):
    report = reports[(name, dtype, index)]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{name} {dtype} config {index} spills: {report}"


if __name__ == "__main__":
    print(json.dumps(compile_kernel(sys.argv[1])))
