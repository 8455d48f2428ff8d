"""bench/device_check.sh's own logic, without a GPU: which steps CNNFAST_STEPS selects, and when
the extension build is skipped. The script runs from a scratch copy of the tree's layout with a
stub in place of Python, so nothing is built or written in the repository."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device_check.sh"
STUB = """#!/bin/sh
# Stands in for Python: records its arguments; `-m pip` fails when FAIL_BUILD is set.
echo "$@" >> "$STUB_LOG"
case "$*" in *"-m pip"*) [ -z "$FAIL_BUILD" ] || exit 1 ;; esac
exit 0
"""


@pytest.fixture
def tree(tmp_path):
    """A scratch tree: bench/device_check.sh, the build inputs it hashes, a built extension."""
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / "device_check.sh")
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml"):
        (tmp_path / name).write_text(name)
    (tmp_path / "kernels" / "cuda").mkdir(parents=True)
    (tmp_path / "kernels" / "cuda" / "kernel.cu").write_text("// v1")
    (tmp_path / "cnnfast").mkdir()
    (tmp_path / "cnnfast" / "_C.cpython-311-x86_64-linux-gnu.so").write_text("")
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def run(tree: Path, steps: str, **env) -> list[tuple[str, str]]:
    """Runs the script with CNNFAST_STEPS=steps; returns its (step, status) rows."""
    out = tree / "out"
    shutil.rmtree(out, ignore_errors=True)
    environment = {**os.environ, "PYTHON": str(tree / "python-stub"), "STUB_LOG": str(tree / "stub.log"),
                   "CNNFAST_STEPS": steps, "PATH": "/usr/bin:/bin", **env}
    subprocess.run(["bash", str(tree / "bench" / "device_check.sh"), str(out)], env=environment, check=True,
                   capture_output=True, timeout=60)
    rows = (out / "steps.tsv").read_text().splitlines()[1:]
    return [tuple(row.split("\t")[:2]) for row in rows]


def names(rows):
    return [name for name, _ in rows]


def test_steps_are_selected_by_name_or_prefix(tree):
    assert names(run(tree, "gpu-tests")) == ["environment", "build", "gpu-tests-new", "gpu-tests-new-cuda",
                                             "gpu-tests-rest", "gpu-tests-cudnn"]
    assert names(run(tree, "gpu-tests-new")) == ["environment", "build", "gpu-tests-new", "gpu-tests-new-cuda"]
    assert names(run(tree, "sanitizer")) == [
        "environment", "build", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-initcheck"]
    rows = run(tree, "benchmarks,report")
    assert names(rows) == ["environment", "build", "benchmarks", "benchmarks-cuda", "benchmarks-table", "report"]
    assert dict(rows)["benchmarks-table"] == "ok"  # its nested quoting runs the command and the copy
    assert names(run(tree, "benchmarks-cuda")) == ["environment", "build", "benchmarks-cuda"]
    assert "model-benchmarks" in names(run(tree, "all"))
    assert names(run(tree, "tune")) == ["environment", "build", "tune"]


def test_build_is_skipped_only_while_its_inputs_are_unchanged(tree):
    assert run(tree, "report")[1] == ("build", "ok")
    assert run(tree, "report")[1] == ("build", "cached")
    (tree / "kernels" / "cuda" / "kernel.cu").write_text("// v2")
    assert run(tree, "report")[1] == ("build", "ok")
    assert run(tree, "report", CMAKE_CUDA_ARCHITECTURES="100a")[1] == ("build", "ok")


def test_a_failed_build_leaves_no_stamp(tree):
    run(tree, "report")
    assert (tree / "cnnfast" / ".build-sources.sha256").is_file()
    (tree / "kernels" / "cuda" / "kernel.cu").write_text("// v2")
    assert run(tree, "report", FAIL_BUILD="1")[1] == ("build", "FAILED (exit 1)")
    assert not (tree / "cnnfast" / ".build-sources.sha256").exists()
    assert run(tree, "report")[1] == ("build", "ok")
