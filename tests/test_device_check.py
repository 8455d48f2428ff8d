"""bench/device_check.sh's own logic, without a GPU: which steps CNNFAST_STEPS selects, when the
extension build is skipped, and how the record comes back (one archive). The script runs from a
scratch copy of the tree's layout with a stub in place of Python, so nothing is built or written in
the repository."""
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device_check.sh"
STUB = """#!/bin/sh
# Stands in for Python: records its arguments (and the kernels archive a build is given). `-m pip`
# fails when FAIL_BUILD is set, or FAIL_PREBUILT and it is given an archive; the archive check
# fails when ARCHIVE_MISMATCH is set, the import of the built module when FAIL_IMPORT is; pytest's
# runs also record where the Triton conv's choices are kept. The report, the summary and the
# environment step write a file each where the real ones do (the report fails when FAIL_REPORT is set).
echo "$@ ${CNNFAST_PREBUILT_KERNELS:+(archive $CNNFAST_PREBUILT_KERNELS)}" >> "$STUB_LOG"
case "$*" in
  *"-m pip"*) [ -z "$FAIL_BUILD" ] || exit 1
              [ -z "$FAIL_PREBUILT" ] || [ -z "$CNNFAST_PREBUILT_KERNELS" ] || exit 1 ;;
  *"kernels_archive check"*) [ -z "$ARCHIVE_MISMATCH" ] || { echo "does not fit"; exit 1; } ;;
  *"import cnnfast._C"*) [ -z "$FAIL_IMPORT" ] || exit 1 ;;
  *"-m pytest"*) echo "pytest's kernel choices: $CNNFAST_KERNEL_CACHE" >> "$STUB_LOG" ;;
  *"cnnfast.cli report"*) mkdir -p "$5" && echo page > "$5/index.html"; [ -z "$FAIL_REPORT" ] || exit 1 ;;
  *"summarize_device_check.py"*) echo summary > "$2/summary.md" ;;
  *"environment.py"*) echo "{}" > "$2" ;;
esac
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
    """Runs the script with CNNFAST_STEPS=steps; returns the (step, status) rows of its record, having
    checked that the script's exit status says whether every step of the record passed."""
    out = tree / "out"
    shutil.rmtree(out, ignore_errors=True)
    environment = {**os.environ, "PYTHON": str(tree / "python-stub"), "STUB_LOG": str(tree / "stub.log"),
                   "CNNFAST_STEPS": steps, "PATH": "/usr/bin:/bin", **env}
    done = subprocess.run(["bash", str(tree / "bench" / "device_check.sh"), str(out)], env=environment,
                          capture_output=True, timeout=60)
    rows = [tuple(row.split("\t")[:2]) for row in record(tree)["steps.tsv"].decode().splitlines()[1:]]
    last = dict(rows)  # a step run again in a continued call is judged by its last run
    failed = any(status.startswith(("FAILED", "timeout", "killed", "skipped")) for status in last.values())
    assert done.returncode == (1 if failed else 0), (rows, done.stderr)
    return rows


def record(tree: Path) -> dict[str, bytes]:
    """The files of out/results.tar.gz, the record the script leaves in its output folder."""
    with tarfile.open(tree / "out" / "results.tar.gz") as tar:
        return {member.name.removeprefix("./"): tar.extractfile(member).read() for member in tar if member.isfile()}


def names(rows):
    return [name for name, _ in rows]


def test_steps_are_selected_by_name_or_prefix(tree):
    assert names(run(tree, "gpu-tests")) == ["environment", "build", "gpu-tests-tma", "gpu-tests-new",
                                             "gpu-tests-new-cuda", "gpu-tests-rest", "gpu-tests-cudnn"]
    assert names(run(tree, "gpu-tests-new")) == ["environment", "build", "gpu-tests-new", "gpu-tests-new-cuda"]
    assert names(run(tree, "sanitizer")) == [
        "environment", "build", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-initcheck"]
    rows = run(tree, "benchmarks,report")
    assert names(rows) == ["environment", "build", "benchmarks-conv", "benchmarks-memory", "benchmarks-cuda",
                           "benchmarks-table", "report"]
    assert dict(rows)["benchmarks-table"] == "ok"  # its nested quoting runs the command and the copy
    assert names(run(tree, "benchmarks-cuda")) == ["environment", "build", "benchmarks-cuda"]
    assert names(run(tree, "benchmarks-conv,benchmarks-table")) == [
        "environment", "build", "benchmarks-conv", "benchmarks-table"]
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


def test_a_kernels_archive_that_fits_is_linked_and_any_failure_falls_back_to_the_full_build(tree):
    (tree / ".prebuilt").mkdir()
    (tree / ".prebuilt" / "libcnnfast_kernels.a").write_text("")
    log = tree / "stub.log"
    assert run(tree, "tune")[1:] == [("build-prebuilt", "ok"), ("tune", "ok")]
    builds = [line for line in log.read_text().splitlines() if "-m pip" in line]
    assert builds == [f"-m pip install -v --no-build-isolation --no-deps -e . (archive {tree}/.prebuilt/libcnnfast_kernels.a)"]
    assert run(tree, "tune")[1] == ("build", "cached")  # the stamp holds for a build from the archive too

    def rows_after_a_source_change(**env):
        (tree / "kernels" / "cuda" / "kernel.cu").write_text(f"// {env}")
        return run(tree, "tune", **env)[1:3]

    # The archive's check refuses it: the full build, without the archive.
    assert rows_after_a_source_change(ARCHIVE_MISMATCH="1") == [("build", "ok"), ("tune", "ok")]
    assert b"does not fit" in record(tree)["device_check.log"]
    assert [line for line in log.read_text().splitlines() if "-m pip" in line][-1].endswith("-e . ")
    # The build from the archive, or the import of what it built, fails: the full build follows.
    assert rows_after_a_source_change(FAIL_PREBUILT="1") == [("build-prebuilt", "FAILED (exit 1)"), ("build", "ok")]
    assert (tree / "cnnfast" / ".build-sources.sha256").is_file()
    assert rows_after_a_source_change(FAIL_IMPORT="1") == [("build-prebuilt", "FAILED (exit 1)"),
                                                           ("build", "FAILED (exit 1)")]
    assert not (tree / "cnnfast" / ".build-sources.sha256").exists()
    # No archive: no check, the full build.
    (tree / ".prebuilt" / "libcnnfast_kernels.a").unlink()
    checks = log.read_text().count("kernels_archive check")
    assert rows_after_a_source_change() == [("build", "ok"), ("tune", "ok")]
    assert log.read_text().count("kernels_archive check") == checks


def test_the_kernel_choices_are_shared_by_the_benchmarks_and_filed_but_not_the_tests(tree):
    choices = tree / "home-cache" / "triton_conv2d.json"
    choices.parent.mkdir()
    choices.write_text('{"H200": {}}')
    run(tree, "gpu-tests-tma,benchmarks", CNNFAST_KERNEL_CACHE=str(choices))
    recorded = [line for line in (tree / "stub.log").read_text().splitlines() if line.startswith("pytest's")]
    assert recorded == ["pytest's kernel choices: /dev/null"] + [f"pytest's kernel choices: {choices}"] * 3
    assert record(tree)["triton_conv2d_choices.json"] == b'{"H200": {}}'


def test_the_record_comes_back_as_one_archive_and_a_summary(tree):
    """The device tool brings back at most 8 files: the output folder holds the archive and the summary."""
    run(tree, "all")
    assert sorted(p.name for p in (tree / "out").iterdir()) == ["results.tar.gz", "summary.md"]
    files = record(tree)
    assert {"env.json", "steps.tsv", "device_check.log", "summary.md"} <= set(files)


def test_a_report_is_archived_as_one_file_even_when_it_fails(tree):
    assert dict(run(tree, "report", FAIL_REPORT="1"))["report"] == "FAILED (exit 1)"
    files = record(tree)
    assert "report.tar.gz" in files and not any(name.startswith("report/") for name in files)
    with tarfile.open(fileobj=io.BytesIO(files["report.tar.gz"])) as report:
        assert "report/index.html" in report.getnames()


def test_a_second_call_adds_to_the_record_only_when_asked(tree):
    run(tree, "tune")
    assert set(record(tree)) >= {"env.json"} and "env_continued.json" not in record(tree)
    assert names(run(tree, "report", CNNFAST_CONTINUE="1")) == ["environment", "build", "tune", "environment",
                                                                 "build", "report"]
    # The first call's environment (its start time and commit) stays the record's; the second's goes beside it.
    assert {"env.json", "env_continued.json"} <= set(record(tree))
    assert names(run(tree, "report")) == ["environment", "build", "report"]
    assert "env_continued.json" not in record(tree)


def test_a_deadline_cuts_each_steps_limit_to_the_time_left_and_skips_what_cannot_start(tree):
    """CNNFAST_DEADLINE: 30 s are kept for the summary and the archive; a step gets the rest, and
    one with under 20 s left is recorded as skipped (and the call fails)."""
    rows = run(tree, "tune", CNNFAST_DEADLINE="55")
    assert dict(rows)["tune"] == "ok"
    log = record(tree)["device_check.log"].decode()
    limits = [int(line.split("limit ")[1].split("s)")[0]) for line in log.splitlines() if line.startswith("=== tune")]
    assert len(limits) == 1 and 20 <= limits[0] <= 25
    rows = run(tree, "tune", CNNFAST_DEADLINE="45")
    assert rows == [("environment", "skipped (deadline)"), ("build", "cached"), ("tune", "skipped (deadline)")]


INTERRUPTED_BENCHMARKS = """
def test_timed(benchmark):
    benchmark.pedantic(lambda: None, rounds=3)


def test_interrupted_in_its_warm_up(benchmark):
    def interrupted():
        raise KeyboardInterrupt  # device_check.sh's SIGINT, arriving before the first round
    benchmark.pedantic(interrupted, rounds=3)
"""


def test_an_interrupted_benchmark_run_still_writes_the_cases_that_ran(tmp_path):
    """bench/conftest.py drops a case left without rounds, which would make pytest-benchmark's JSON
    writer fail and save nothing."""
    (tmp_path / "test_cases.py").write_text(INTERRUPTED_BENCHMARKS)
    repo = SCRIPT.parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.conftest", "-p", "no:cacheprovider", "-q", str(tmp_path),
         f"--benchmark-json={tmp_path / 'out.json'}", f"--rootdir={tmp_path}"],
        # Without this run's pytest-xdist variables, which would turn pytest-benchmark off there.
        cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, "PYTHONPATH": str(repo)},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr  # interrupted
    saved = json.loads((tmp_path / "out.json").read_text())["benchmarks"]
    assert [case["name"] for case in saved] == ["test_timed"]


def test_a_build_skipped_by_the_deadline_leaves_no_stamp(tree):
    run(tree, "tune")
    (tree / "kernels" / "cuda" / "kernel.cu").write_text("// v2")
    assert dict(run(tree, "tune", CNNFAST_DEADLINE="45"))["build"] == "skipped (deadline)"
    assert not (tree / "cnnfast" / ".build-sources.sha256").exists()
    assert dict(run(tree, "tune"))["build"] == "ok"  # built, not taken for cached


def test_a_step_cut_short_and_run_again_in_a_continued_call_counts_once(tree):
    assert ("tune", "skipped (deadline)") in run(tree, "tune", CNNFAST_DEADLINE="45")
    rows = run(tree, "tune", CNNFAST_CONTINUE="1")  # run() checks the exit status: 0, by the last rows
    assert rows[-1] == ("tune", "ok") and ("tune", "skipped (deadline)") in rows
