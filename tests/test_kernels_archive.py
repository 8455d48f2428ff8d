"""bench/kernels_archive.py: when a carried kernels archive fits a tree, and that cnnfast._C built
from the archive alone (bindings.cpp compiled, no kernel) is the installed module again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernels_archive
from tests.test_build import cuobjdump_resource_usage

NVCC = Path("/usr/local/cuda/bin/nvcc")


@pytest.fixture
def scratch_tree(tmp_path):
    """A tree with the files the archive's hash reads, and an archive recorded for it."""
    root = tmp_path / "tree"
    (root / "kernels" / "cuda").mkdir(parents=True)
    for name in ("add_relu.cu", "conv2d_cutlass.cuh", "bindings.cpp"):
        (root / "kernels" / "cuda" / name).write_text(f"// {name}")
    (root / "CMakeLists.txt").write_text("project(x)")
    (tmp_path / "libcnnfast_kernels.a").write_text("!<arch>")
    kernels_archive.record(tmp_path / "prebuilt", tmp_path / "libcnnfast_kernels.a", ["add_relu.cu.o"],
                           kernels_archive.build_inputs(root))
    return root


def test_the_archive_fits_until_a_kernel_source_or_the_target_changes(scratch_tree, monkeypatch):
    prebuilt = scratch_tree.parent / "prebuilt"
    assert kernels_archive.mismatch(prebuilt, scratch_tree) is None
    # bindings.cpp is compiled where the module is linked: the archive still fits.
    (scratch_tree / "kernels" / "cuda" / "bindings.cpp").write_text("// changed")
    assert kernels_archive.mismatch(prebuilt, scratch_tree) is None
    (scratch_tree / "kernels" / "cuda" / "conv2d_cutlass.cuh").write_text("// changed")
    assert kernels_archive.mismatch(prebuilt, scratch_tree) == "built from other inputs: kernels/cuda/conv2d_cutlass.cuh"
    (scratch_tree / "kernels" / "cuda" / "conv2d_cutlass.cuh").write_text("// conv2d_cutlass.cuh")
    (scratch_tree / "kernels" / "cuda" / "new_kernel.cu").write_text("//")
    assert kernels_archive.mismatch(prebuilt, scratch_tree) == "built from other inputs: kernels/cuda/new_kernel.cu"
    (scratch_tree / "kernels" / "cuda" / "new_kernel.cu").unlink()
    monkeypatch.setenv("CMAKE_CUDA_ARCHITECTURES", "100a")
    assert kernels_archive.mismatch(prebuilt, scratch_tree) == "built from other inputs: architectures: '90a' -> '100a'"
    monkeypatch.delenv("CMAKE_CUDA_ARCHITECTURES")
    monkeypatch.setattr(kernels_archive, "nvcc_release", lambda: "Cuda compilation tools, release 13.1, V13.1.1")
    assert "nvcc: " in kernels_archive.mismatch(prebuilt, scratch_tree)
    (prebuilt / kernels_archive.ARCHIVE).unlink()
    assert kernels_archive.mismatch(prebuilt, scratch_tree).startswith("no libcnnfast_kernels.a")


def test_check_exits_nonzero_and_says_why(scratch_tree, monkeypatch, capsys):
    monkeypatch.setattr(kernels_archive, "ROOT", scratch_tree)
    prebuilt = scratch_tree.parent / "prebuilt"
    assert kernels_archive.main(["check", str(prebuilt)]) == 0
    assert "fits this tree" in capsys.readouterr().out
    (scratch_tree / "kernels" / "cuda" / "add_relu.cu").write_text("// changed")
    assert kernels_archive.main(["check", str(prebuilt)]) == 1
    assert "does not fit: built from other inputs: kernels/cuda/add_relu.cu" in capsys.readouterr().out


def test_pack_refuses_a_missing_build_and_one_that_links_an_archive(tmp_path):
    with pytest.raises(RuntimeError, match="no CMake build in .*make install"):
        kernels_archive.pack(tmp_path / "prebuilt", build_dir=tmp_path / "nothing")
    (tmp_path / "CMakeCache.txt").write_text("CNNFAST_PREBUILT_KERNELS:FILEPATH=/x/libcnnfast_kernels.a\n")
    with pytest.raises(RuntimeError, match="links a prebuilt archive"):
        kernels_archive.pack(tmp_path / "prebuilt", build_dir=tmp_path)


@pytest.mark.skipif(not NVCC.exists(), reason="needs nvcc, as the installed extension did")
def test_the_module_built_from_the_packed_archive_alone_is_the_installed_one(tmp_path, monkeypatch):
    from cnnfast.backends import cuda_extension

    installed = cuda_extension()
    archive = kernels_archive.pack(tmp_path / "prebuilt")  # the install's own build, brought up to date
    assert kernels_archive.mismatch(tmp_path / "prebuilt") is None
    monkeypatch.setenv("CNNFAST_PREBUILT_KERNELS", str(archive))
    kernels_archive.setup_py.cmake_build(tmp_path / "build", tmp_path / "module")
    # Only bindings.cpp was compiled: no kernel object in this build.
    assert not list((tmp_path / "build").rglob("*.cu.o"))
    [module] = (tmp_path / "module").glob("_C*.so")
    # Loaded in a process of its own: pybind11 would refuse a second cnnfast._C in this one.
    load = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('cnnfast._C', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(json.dumps(m.build_info()))")
    info = subprocess.run([sys.executable, "-c", load, str(module)], capture_output=True, text=True, check=True).stdout
    assert json.loads(info) == json.loads(json.dumps(installed.build_info()))
    assert json.loads(info)["cutlass"]

    def functions(library):
        return sorted(line.strip() for line in cuobjdump_resource_usage(library).splitlines() if "Function" in line)

    assert functions(module) == functions(installed.__file__)
