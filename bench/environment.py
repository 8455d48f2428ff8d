"""Writes the facts a GPU measurement is quoted with (device, versions, commit, date) as JSON.

    python bench/environment.py OUT.json      (CNNFAST_COMMIT names the commit measured)

"sources" maps each source file of the tree measured (source_files) to its git blob id, so that
bench/collect_results.py can check the tree against the commit it is labelled with: the device
machine's copy of the tree has no .git, and may hold changes not yet committed.
"""
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import triton


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    return subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()


ROOT = Path(__file__).resolve().parent.parent
# The files whose content the measurements depend on (the built extension and caches are not sources).
SOURCE_PATTERNS = ("cnnfast/**/*.py", "cnnfast/tuning.json", "kernels/**/*.cu", "kernels/**/*.cuh", "kernels/**/*.cpp",
                   "kernels/**/*.h", "bench/*.py", "bench/*.sh", "tests/*.py", "conftest.py", "setup.py",
                   "CMakeLists.txt", "pyproject.toml", "Makefile")


def pattern_regex(pattern: str) -> str:
    """A glob pattern as Path.glob reads it ("**/" any folders, "*" within one name) as a regex."""
    return "".join("(?:.*/)?" if part == "**/" else "[^/]*" if part == "*" else re.escape(part)
                   for part in re.split(r"(\*\*/|\*)", pattern))


SOURCE_REGEX = re.compile("|".join(f"(?:{pattern_regex(pattern)})" for pattern in SOURCE_PATTERNS))


def is_source(path: str) -> bool:
    """Whether a path relative to the tree's root is one of SOURCE_PATTERNS' files."""
    return SOURCE_REGEX.fullmatch(path) is not None


def blob_id(data: bytes) -> str:
    """git's id of a file with this content (what `git ls-tree` lists)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def source_files(root: Path = ROOT) -> dict[str, str]:
    """{path: git blob id} of the tree's source files."""
    paths = {path for pattern in SOURCE_PATTERNS for path in root.glob(pattern) if path.is_file()}
    return {path.relative_to(root).as_posix(): blob_id(path.read_bytes()) for path in sorted(paths)}


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("CNNFAST_COMMIT", "unknown"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nvidia_smi": nvidia_smi(),
        "sources": source_files(),
    }


if __name__ == "__main__":
    info = environment()
    with open(sys.argv[1], "w") as f:
        json.dump(info, f, indent=1)
    print({key: value for key, value in info.items() if key != "sources"})
