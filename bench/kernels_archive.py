"""The CUDA kernels compiled ahead of a GPU lease, so that the lease does not spend minutes on nvcc.

cnnfast._C is bindings.cpp linked against libcnnfast_kernels.a, the static archive of every
kernels/cuda/*.cu (CMakeLists.txt). The archive needs neither Python nor pybind11, so the one this
machine built (into build/cmake-<interpreter>/ on `make install`) serves a GPU machine with another
Python, as long as its nvcc has the same release: there, CNNFAST_PREBUILT_KERNELS=<archive> makes
the build compile bindings.cpp alone. bench/device_check.sh does that when `check` passes and falls
back to the full build when it does not, or when the module built from the archive does not import.

    python -m bench.kernels_archive pack [DIR]    # here, after make install: DIR (default .prebuilt)
    python -m bench.kernels_archive check [DIR]   # there: exit 0 if DIR's archive fits this tree

`pack` brings the archive up to date with the sources (CMake rebuilds what changed), copies it into
DIR with ARCHIVE_INFO, and refuses an archive without the CUTLASS convolution. `check` compares the
recorded hash with the hash of this tree's sources, nvcc release, target architectures and build type.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_setup_py():
    """The tree's setup.py as a module (by its path: "setup" is no importable name of this project)."""
    spec = importlib.util.spec_from_file_location("cnnfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = load_setup_py()
ARCHIVE = "libcnnfast_kernels.a"
ARCHIVE_INFO = "libcnnfast_kernels.json"
DEFAULT_DIR = ROOT / ".prebuilt"
# bindings.cpp is compiled where the module is linked, so a change to it leaves the archive valid.
NOT_IN_ARCHIVE = {"bindings.cpp"}
# Members that only a build with the CUTLASS headers has.
CUTLASS_MEMBER = re.compile(r"conv2d_cutlass_\w+\.cu\.o$")


def nvcc_release() -> str:
    """nvcc's release line ("Cuda compilation tools, release 13.0, V13.0.88"), or why there is none."""
    nvcc = setup_py.find_nvcc()
    if nvcc is None:
        return "no nvcc"
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    return next((line.strip() for line in version.splitlines() if "release" in line), version.strip())


def build_inputs(root: Path | None = None, architectures: str | None = None, build_type: str | None = None) -> dict:
    """What the archive's object code depends on: each source's digest, CMakeLists.txt's, the nvcc
    release, the target architectures and the build type (by default as setup.py would pass them to
    CMake from this environment)."""
    root = root or ROOT
    sources = sorted(path for path in (root / "kernels" / "cuda").iterdir()
                     if path.is_file() and path.name not in NOT_IN_ARCHIVE)
    return {
        "sources": {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                    for path in [*sources, root / "CMakeLists.txt"]},
        "nvcc": nvcc_release(),
        "architectures": architectures or os.environ.get("CMAKE_CUDA_ARCHITECTURES", "90a"),
        "build_type": build_type or os.environ.get("CMAKE_BUILD_TYPE", "Release"),
    }


def inputs_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def archive_members(archive: Path) -> list[str]:
    return subprocess.run(["ar", "t", str(archive)], capture_output=True, text=True, check=True).stdout.split()


def pack(dest: Path, build_dir: Path | None = None) -> Path:
    """Rebuilds the kernels' archive in build_dir (default: setup.py's) and copies it with its build
    inputs into dest. Raises RuntimeError when there is no such build, or it has no CUTLASS."""
    build_dir = build_dir or setup_py.cmake_build_dir()
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        raise RuntimeError(f"no CMake build in {build_dir}: run `make install` (with nvcc) first")
    configured = dict(re.findall(r"^(\w+):[A-Z]+=(.*)$", cache.read_text(), re.MULTILINE))
    if configured.get("CNNFAST_PREBUILT_KERNELS"):
        raise RuntimeError(f"{build_dir} links a prebuilt archive instead of compiling the kernels: "
                           "reinstall without CNNFAST_PREBUILT_KERNELS")
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "cnnfast_kernels"], check=True)
    archive = build_dir / ARCHIVE
    members = archive_members(archive)
    if not any(CUTLASS_MEMBER.search(member) for member in members):
        raise RuntimeError(f"{archive} has no CUTLASS convolution ({', '.join(members)}): install nvidia-cutlass "
                           "and rebuild (make install)")
    # The target and build type the folder was configured with, whatever this environment says.
    inputs = build_inputs(architectures=configured["CMAKE_CUDA_ARCHITECTURES"], build_type=configured["CMAKE_BUILD_TYPE"])
    return record(dest, archive, members, inputs)


def record(dest: Path, archive: Path, members: list[str], inputs: dict) -> Path:
    """Copies archive into dest beside ARCHIVE_INFO: its members, and its build inputs with their hash."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, dest / ARCHIVE)
    info = {"sha256": inputs_hash(inputs), "inputs": inputs, "members": members}
    (dest / ARCHIVE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return dest / ARCHIVE


def mismatch(dest: Path, root: Path | None = None) -> str | None:
    """Why dest's archive does not fit the tree at root, by default this one (None when it does)."""
    if not (dest / ARCHIVE).is_file() or not (dest / ARCHIVE_INFO).is_file():
        return f"no {ARCHIVE} with its {ARCHIVE_INFO} in {dest}"
    recorded = json.loads((dest / ARCHIVE_INFO).read_text())
    current = build_inputs(root)
    if recorded.get("sha256") == inputs_hash(current):
        return None
    before = recorded.get("inputs", {})
    changed = [name for name in sorted({*before.get("sources", {}), *current["sources"]})
               if before.get("sources", {}).get(name) != current["sources"].get(name)]
    changed += [f"{key}: {before.get(key)!r} -> {current[key]!r}" for key in ("nvcc", "architectures", "build_type")
                if before.get(key) != current[key]]
    return "built from other inputs: " + "; ".join(changed or ["the recorded hash"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels_archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["pack", "check"])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.command == "pack":
        try:
            archive = pack(args.dir)
        except RuntimeError as error:
            print(f"kernels_archive: {error}", file=sys.stderr)
            return 1
        print(f"kernels_archive: {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
        return 0
    why = mismatch(args.dir)
    print(f"kernels_archive: {args.dir / ARCHIVE} " + ("fits this tree" if why is None else f"does not fit: {why}"))
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
