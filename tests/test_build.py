"""The build switch of setup.py (CNNFAST_BUILD_CUDA) and what the installed extension reports."""
from pathlib import Path

import pytest

from bench.kernels_archive import load_setup_py


@pytest.fixture
def setup_module():
    return load_setup_py()


def test_build_cuda_0_installs_pure_python(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "0")
    assert setup_module.cuda_extensions() == []


def test_build_cuda_1_fails_loudly_without_nvcc(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match="not found: nvcc"):
        setup_module.cuda_extensions()


def test_build_cuda_auto_skips_without_nvcc(setup_module, monkeypatch, capsys):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "auto")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert setup_module.cuda_extensions() == []
    assert "installing without it" in capsys.readouterr().err


def test_build_cuda_rejects_unknown_mode(setup_module, monkeypatch):
    monkeypatch.setenv("CNNFAST_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be auto, 1 or 0"):
        setup_module.cuda_extensions()


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs nvcc at install time")
def test_extension_built_for_hopper():
    from cnnfast.backends import cuda_extension

    assert "90a" in cuda_extension().build_info()["architectures"]


def cuobjdump_resource_usage(library=None) -> str:
    """cuobjdump (the copy triton ships) over a library, by default the installed extension: every
    kernel with its resources."""
    import subprocess

    import triton

    from cnnfast.backends import cuda_extension

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    library = library or cuda_extension().__file__
    return "".join(
        subprocess.run([str(tool), flag, library], capture_output=True, text=True, check=True).stdout
        for flag in ("--list-elf", "--dump-resource-usage")
    )


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs nvcc at install time")
def test_every_kernel_is_in_the_sm90a_cubin_without_local_memory():
    dump = cuobjdump_resource_usage()
    assert "sm_90a.cubin" in dump
    # Each kernel in each dtype (float, __half, __nv_bfloat16) and each template variant.
    kernels = {kernel: ("If", "I6__half", "I13__nv_bfloat16") for kernel in (
        "global_avg_pool_nhwc_kernel", "global_avg_pool_planes_kernel", "add_relu_flat_kernel", "add_relu_strided_kernel",
        "linear_few_rows_kernel")}
    kernels["linear_wmma_kernel"] = ("I6__half", "I13__nv_bfloat16")  # float32 stays off the tensor cores
    for kernel, dtypes in kernels.items():
        for dtype in dtypes:
            assert f"{kernel}{dtype}" in dump, f"{kernel} for {dtype} missing from the cubin"
    from cnnfast.backends import cuda_extension

    if "conv2d" in cuda_extension().build_info()["ops"]:
        # The CUTLASS conv, by wgmma instruction (64 rows x the tile's width): 128-wide tiles with
        # ReLU and without in float16, bfloat16 and tf32, and 64-wide tiles with ReLU in float16 and bfloat16.
        conv_kernels = [line for line in dump.splitlines() if "Function" in line and "ConvUniversal" in line]
        expected = {"MMA_64x128x16_F32F16F16_SS": 2, "MMA_64x128x16_F32BF16BF16_SS": 2, "MMA_64x128x8_F32TF32TF32_SS": 2,
                    "MMA_64x64x16_F32F16F16_SS": 1, "MMA_64x64x16_F32BF16BF16_SS": 1}
        for mma, count in expected.items():
            kernels = [line for line in conv_kernels if mma in line]
            assert len(kernels) == count, f"{mma}: {len(kernels)} conv kernels, expected {count}"
            if count == 1:  # the 64-wide tile is built with the ReLU epilogue only
                assert "ReLu" in kernels[0]
        assert len(conv_kernels) == sum(expected.values())
        # The 1x1 convs' GEMM: one persistent ping-pong kernel with ReLU per 16-bit dtype.
        gemm_kernels = [line for line in dump.splitlines() if "Function" in line and "GemmUniversal" in line]
        for mma in ("MMA_64x128x16_F32F16F16_SS", "MMA_64x128x16_F32BF16BF16_SS"):
            kernels = [line for line in gemm_kernels if mma in line]
            assert len(kernels) == 1, f"{mma}: {len(kernels)} GEMM kernels, expected 1"
            assert "KernelTmaWarpSpecializedPingpong" in kernels[0] and "ReLu" in kernels[0]
        assert len(gemm_kernels) == 2
    usage = [line for line in dump.splitlines() if "REG:" in line]
    assert usage and all(" LOCAL:0 " in line and " STACK:0 " in line for line in usage)
