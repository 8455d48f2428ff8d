"""Builds cnnfast, and its CUDA extension cnnfast._C with CMake when nvcc is available.

CNNFAST_BUILD_CUDA=auto (default) builds the extension when nvcc is found and says so when it
is not; =1 fails when it cannot build; =0 installs the pure-Python package.
CMAKE_CUDA_ARCHITECTURES (default 90a) and CMAKE_BUILD_PARALLEL_LEVEL pass through to CMake.
The CUTLASS convolution is built when nvidia-cutlass (cutlass_library) is installed, and left out
(with a message) when it is not. CNNFAST_PREBUILT_KERNELS=PATH links the kernels from an archive
compiled earlier (bench/kernels_archive.py) and compiles only the bindings.

CMake builds in build/cmake-<interpreter>-<generator>/ of the source tree, kept between installs,
so that a rebuild compiles only the kernels whose sources changed (the CUTLASS ones take minutes each).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    if candidate.is_file():
        return candidate
    found = shutil.which("nvcc")
    return Path(found) if found else None


def find_cutlass_include_dirs():
    """CUTLASS's include/ and tools/util/include/ from the nvidia-cutlass wheel, or None without it."""
    # Found, not imported: the headers are all the build needs, not the package's Python side.
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).resolve().parent / "source"
    dirs = [source / "include", source / "tools" / "util" / "include"]
    if not all((d / "cutlass").is_dir() for d in dirs):
        return None
    return dirs


def cmake_generator() -> list[str]:
    """CMake's generator arguments: Ninja, named by path, when it is found (an isolated pip build
    finds it in a temporary environment, so the path is given on every configure); else the default."""
    ninja = shutil.which("ninja")
    return ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def cmake_build_dir() -> Path:
    """Where CMake builds for this interpreter and generator (a build folder keeps its generator);
    it holds libcnnfast_kernels.a, the kernels' archive."""
    generator = "ninja" if shutil.which("ninja") else "default"
    return ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{generator}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def cmake_configure_args(library_dir: Path) -> list[str]:
    """CMake's arguments for building cnnfast._C into library_dir, as the environment asks."""
    import pybind11

    args = [
        f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={library_dir}",
        f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
    ]
    prebuilt = os.environ.get("CNNFAST_PREBUILT_KERNELS")
    if prebuilt:  # its kernels are compiled already, with or without CUTLASS
        args.append(f"-DCNNFAST_PREBUILT_KERNELS={Path(prebuilt).resolve()}")
    else:
        # Both always passed: a kept build folder must not hold on to an earlier configure's values.
        cutlass_dirs = find_cutlass_include_dirs()
        args.append("-DCNNFAST_PREBUILT_KERNELS=")
        args.append(f"-DCUTLASS_INCLUDE_DIRS={';'.join(str(d) for d in cutlass_dirs or [])}")
        if not cutlass_dirs:
            print("cnnfast: nvidia-cutlass (cutlass_library) not found; building without the CUTLASS conv",
                  file=sys.stderr)
    # Passed every time, default included, so that a kept build folder does not keep an earlier value.
    args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CMAKE_CUDA_ARCHITECTURES', '90a')}")
    return args + cmake_generator()


def cmake_build(build_dir: Path, library_dir: Path) -> None:
    """Configures and builds cnnfast._C in build_dir, the module landing in library_dir."""
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cmake_configure_args(library_dir)], check=True)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cmake_build(cmake_build_dir(), Path(self.get_ext_fullpath(ext.name)).resolve().parent)


def cuda_extensions():
    mode = os.environ.get("CNNFAST_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"CNNFAST_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        print("cnnfast: CNNFAST_BUILD_CUDA=0, installing without the CUDA extension", file=sys.stderr)
        return []
    missing = [tool for tool, path in (("nvcc", find_nvcc()), ("cmake", shutil.which("cmake"))) if path is None]
    if missing:
        message = f"cnnfast: cannot build the CUDA extension, not found: {', '.join(missing)} (set CUDA_HOME)"
        if mode == "1":
            raise SystemExit(message)
        print(message + "; installing without it", file=sys.stderr)
        return []
    return [CMakeExtension("cnnfast._C")]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    setup(ext_modules=cuda_extensions(), cmdclass={"build_ext": CMakeBuild})
