"""The Hopper autotune configs of the persistent TMA kernel of convs on spatial tiles
(conv2d_spatial.py) compile for sm_90a, with and without a residual: no register spill, wgmma and
TMA loads in the PTX, x's tile loaded into registers (which the shared-memory estimate assumes:
one pipeline stage fewer of it), and that estimate covering what the compiled kernel takes, so
that pruning never lets through a kernel that cannot launch.

Compiled: every column tile with the first shape of its tile size (8x16 / 8x8 pixels of one
image), and the last shape of each size (single pixels of 128 / 64 images) with its first column
tile, in bfloat16 (float16 compiles to the same code but for the wgmma type), one subprocess per
half of the list. (The shapes in between compile to the same loop with another reshape of x's
tile; all 38 configs were compiled this way once, at stride 1 and 2, with and without a residual,
under triton 3.8 and 3.6: no spills, wgmma in each, registers 81 to 254, a stride of 2 costing
about two.)
"""
import json
import re
import sys

import pytest
import torch

from cnnfast.triton_kernels import conv2d_spatial
from tests.test_int64_indexing import recorded
from tests.test_triton_compile import compile_for_hopper, compile_in_subprocesses, ptxas_report
from tests.test_triton_compile_pointwise import HOPPER_SHARED_MEMORY


def compiled_configs():
    configs = conv2d_spatial.conv2d_spatial_configs(interpreted=False)
    chosen = []
    for block_m, shapes in conv2d_spatial.SPATIAL_SHAPES.items():
        of_size = [config for config in configs if config.kwargs["BLOCK_M"] == block_m]
        for config in of_size:
            shape = conv2d_spatial.spatial_shape(config)
            first_tile = conv2d_spatial.column_tile(config) == conv2d_spatial.COLUMN_TILES[block_m][0]
            if shape == shapes[0] or (shape == shapes[-1] and first_tile):
                chosen.append(config)
    return chosen


CONFIGS = compiled_configs()
HALVES = ("0", "1")


def compile_half(half: str) -> list[dict]:
    """A report per (config, residual) of one half of CONFIGS: registers, spills, shared memory
    (estimated and compiled), wgmma, TMA and whether x's tile is loaded into registers, for one of
    ResNet-50's layer3 3x3 convs at batch 8 (256 channels, 14x14 out): the stride-1 one for the
    configs at even indices, the stride-2 one (28x28 in) for those at odd indices. The kernel is
    the same code for both, but a stride of 1 is a constant in it (Triton specializes arguments
    equal to 1), and one of 2 leaves a division and a remainder per tap."""
    dtype, reports = torch.bfloat16, []
    for index, config in enumerate(CONFIGS):
        if index % 2 != int(half):
            continue
        stride = 1 + index % 2
        for residual in (False, True):
            x = torch.empty(8, 256, 14 * stride, 14 * stride, dtype=dtype, memory_format=torch.channels_last)
            weight = torch.empty(256, 256, 3, 3, dtype=dtype, memory_format=torch.channels_last)
            out = torch.empty(8, 256, 14, 14, dtype=dtype, memory_format=torch.channels_last)
            res = torch.empty_like(out) if residual else None
            launch = recorded(conv2d_spatial.conv2d_spatial_kernel, lambda: conv2d_spatial.launch(
                x, weight, torch.empty(256), res, out, (stride, stride), (1, 1), (1, 1), True, config=config))
            kernel = compile_for_hopper(*launch)
            ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
            reports.append(ptxas_report(ptx) | {
                "index": index, "residual": residual, "shared": kernel.metadata.shared,
                "estimate": conv2d_spatial.shared_memory(config, dtype.itemsize, residual),
                "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
                # x's tile (the kernel's `a`, whose name the TTGIR values keep) loaded into registers
                "x_in_registers": re.search(r"%a(_\d+)? = ttg\.local_load", ttgir) is not None})
    return reports


@pytest.fixture(scope="module")
def reports():
    outputs = compile_in_subprocesses(__file__, [(half,) for half in HALVES])
    return {(report["index"], report["residual"]): report for output in outputs.values() for report in output}


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[conv2d_spatial.config_name(c) for c in CONFIGS])
def test_compiles_for_hopper_with_wgmma_and_tma_without_spills(reports, index, residual):
    report = reports[(index, residual)]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["ptxas_log"]
    assert report["wgmma"] and report["tma"]
    assert report["x_in_registers"]
    # The estimate covers the kernel, within the 2 KB it keeps beyond the tiles.
    assert report["shared"] <= report["estimate"] < report["shared"] + 2048
    if report["estimate"] > HOPPER_SHARED_MEMORY:  # pruned on Hopper: it never launches
        assert residual and CONFIGS[index].kwargs["BLOCK_N"] == 256, "only 256-wide tiles with a residual may not fit"


if __name__ == "__main__":
    print(json.dumps(compile_half(sys.argv[1])))
