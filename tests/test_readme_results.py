"""bench/readme_results.py, bench/summarize_device_check.py and bench/collect_results.py, on synthetic GPU runs."""
import gzip
import json
import tarfile

import pytest

from bench.collect_results import collect
from bench.readme_results import run_section
from bench import summarize_device_check


def model_case(arch, batch, variant, ms, speedup):
    info = {"device": "NVIDIA H200", "dtype": "bf16", "backend": variant, "arch": arch, "shape": [batch, 3],
            "ms": ms, "images_per_s": batch / (ms * 1e-3), "speedup_vs_torch": speedup}
    return {"name": f"test_model[{arch}-b{batch}-{variant}]", "extra_info": info}


def test_run_section_has_the_kernel_and_model_tables(tmp_path):
    run = tmp_path / "h200-2026-12-01-run1"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13.0",
                                              "date": "2026-12-01T10:00:00", "commit": "abc1234"}))
    add = {"device": "NVIDIA H200", "dtype": "bf16", "ms": 0.1, "fraction_of_copy_bandwidth": 0.95}
    benchmarks = [
        {"name": "test_add_relu_gpu[a]", "extra_info": {**add, "backend": "triton", "speedup_vs_torch": 1.6}},
        {"name": "test_add_relu_gpu[b]", "extra_info": {**add, "backend": "triton", "speedup_vs_torch": 1.4}},
        {"name": "test_add_relu_gpu[c]", "extra_info": {**add, "backend": "torch", "speedup_vs_torch": 1.0}},
        model_case("resnet50", 256, "eager", 100.0, 1.0), model_case("resnet50", 256, "cnnfast", 50.0, 2.0),
        model_case("resnet50", 1, "eager", 2.0, 1.0), model_case("resnet50", 1, "cnnfast_graph", 0.4, 5.0),
    ]
    (run / "benchmarks.json").write_text(json.dumps({"benchmarks": benchmarks}))
    (run / "steps.tsv").write_text("step\tstatus\tseconds\nbuild\tcached\t0\ngpu-tests-tma\tok\t100\n"
                                   "benchmarks-conv\ttimeout (240s)\t240\n")
    (run / "gpu_tests_tma.xml").write_text('<testsuite tests="12" failures="1" errors="0" skipped="2"/>')
    (run / "NOTE.md").write_text("The conv kernel was rewritten after this run.\n")
    text = "\n".join(run_section(run))
    assert ("Steps that failed or ran out of time (a timed-out step's counts are partial): "
            "benchmarks-conv (timeout (240s)).") in text
    assert "GPU tests: 9 passed, 1 failed, 2 skipped." in text
    assert "Note: The conv kernel was rewritten after this run." in text
    assert "| test_add_relu_gpu | triton | bf16 | 2 | 1.50 (1.40 - 1.60) | torch | 95 |  |" in text
    assert "test_model" not in text  # the models have their own table
    assert "| model | batch | eager | cnnfast | cnnfast_graph |" in text
    assert "| resnet50 | 256 | 2,560 img/s (1.00x) | 5,120 img/s (2.00x) |  |" in text
    assert "| resnet50 | 1 | 2.000 ms (1.00x) |  | 0.400 ms (5.00x) |" in text


def test_device_check_summary_sums_the_gpu_test_steps(tmp_path):
    assert summarize_device_check.tests_line(tmp_path) == "GPU tests: no result file"
    for name, (tests, failures, errors, skipped) in {"new": (10, 1, 0, 2), "rest": (5, 0, 1, 0)}.items():
        (tmp_path / f"gpu_tests_{name}.xml").write_text(
            f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="{errors}" skipped="{skipped}"/></testsuites>')
    assert summarize_device_check.tests_line(tmp_path) == "GPU tests: 11 passed, 2 failed, 2 skipped"


H200_ENV = {"gpu": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00", "commit": "abc1234"}


def test_collect_files_a_run_under_the_next_free_name(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "env.json").write_text(json.dumps(H200_ENV))
    for name in ("steps.tsv", "summary.md", "gpu_tests_new.xml", "benchmarks.json", "tune_resnet50_b1.json",
                 "tuning_local.json", "stray.txt"):
        (out / name).write_text(name)
    (out / "device_check.log").write_text("the log")
    (results / "h200-2026-12-01-run2-memory-bound").mkdir(parents=True)  # a run with a note counts too
    first = collect(out, results=results)
    assert first.name == "h200-2026-12-01-run3"
    assert sorted(p.name for p in first.iterdir()) == [
        "benchmarks.json", "device_check.log.gz", "env.json", "gpu_tests_new.xml", "steps.tsv", "summary.md",
        "tune_resnet50_b1.json", "tuning_local.json"]
    assert gzip.decompress((first / "device_check.log.gz").read_bytes()) == b"the log"
    # The same record again (a later call's archive holds the first's): refused, or filed in its place.
    with pytest.raises(SystemExit, match="filed already, as h200-2026-12-01-run3"):
        collect(out, results=results)
    (out / "benchmarks_models.json").write_text("models")
    again = collect(out, results=results, replace=True)
    assert again.name == "h200-2026-12-01-run3" and (again / "benchmarks_models.json").is_file()
    assert sorted(p.name for p in results.iterdir()) == ["h200-2026-12-01-run2-memory-bound", "h200-2026-12-01-run3"]
    with pytest.raises(SystemExit, match="no env.json"):
        collect(tmp_path / "results", results=results)


@pytest.mark.parametrize("env, message", [
    ({**H200_ENV, "gpu": None}, "has no GPU"),
    ({key: value for key, value in H200_ENV.items() if key != "commit"}, "which commit"),
    ({**H200_ENV, "commit": "unknown"}, "which commit"),
])
def test_collect_refuses_a_record_it_cannot_label_unless_forced(tmp_path, env, message):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "env.json").write_text(json.dumps(env))
    with pytest.raises(SystemExit, match=message):
        collect(out, results=results)
    assert collect(out, results=results, force=True).is_dir()


def test_collect_takes_only_names_runs_are_ordered_by(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "env.json").write_text(json.dumps(H200_ENV))
    with pytest.raises(SystemExit, match="expected <gpu>-<YYYY-MM-DD>-run<N>"):
        collect(out, "h200-tma-check", results=results)
    assert collect(out, "h200-2026-12-01-run7-tma-check", results=results).name == "h200-2026-12-01-run7-tma-check"


def test_collect_unpacks_the_archive_device_check_leaves(tmp_path):
    """device_check.sh leaves its record as results.tar.gz (the device tool brings back 8 files at most)."""
    record, out, results = tmp_path / "record", tmp_path / "out", tmp_path / "results"
    record.mkdir()
    out.mkdir()
    (record / "env.json").write_text(json.dumps(H200_ENV))
    (record / "benchmarks_conv.json").write_text("{}")
    (record / "device_check.log").write_text("the log")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(record, arcname=".")
    (out / "summary.md").write_text("summary")
    filed = collect(out, results=results)
    assert sorted(p.name for p in filed.iterdir()) == ["benchmarks_conv.json", "device_check.log.gz", "env.json"]
    (out / "results.tar.gz").unlink()
    with pytest.raises(SystemExit, match="no env.json"):
        collect(out, results=results)


def test_results_list_every_run_with_a_benchmark_file_in_run_order(tmp_path, monkeypatch):
    """A call that ran only the model benchmarks (benchmarks_models.json) is listed too, and run 10
    of a day comes after run 2."""
    from bench import readme_results

    for name, file in (("h200-2026-12-01-run10", "benchmarks_models.json"), ("h200-2026-12-01-run2", "benchmarks.json"),
                       ("h200-2026-12-01-run3", "steps.tsv")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(json.dumps({"benchmarks": []}))
    monkeypatch.setattr(readme_results, "RESULTS", tmp_path)
    monkeypatch.setattr(readme_results, "run_section", lambda folder: [folder.name])
    assert readme_results.results_markdown() == "h200-2026-12-01-run2\nh200-2026-12-01-run10"


def test_the_readme_results_section_is_the_one_the_committed_runs_give():
    from pathlib import Path

    from bench import readme_results

    readme = (Path(readme_results.__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split(readme_results.START, 1)[1].split(readme_results.END, 1)[0]
    assert section == f"\n{readme_results.results_markdown()}\n"


def test_the_tree_measured_is_checked_against_its_commit(tmp_path, monkeypatch):
    """env.json's "sources" (git blob ids of the measured tree's source files) against the commit's."""
    import subprocess

    from bench import collect_results
    from bench.environment import source_files

    repo = tmp_path / "repo"
    (repo / "cnnfast").mkdir(parents=True)
    (repo / "cnnfast" / "ops.py").write_text("v1\n")
    (repo / "setup.py").write_text("setup\n")
    (repo / "notes.txt").write_text("not a source\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"commit": commit, "sources": source_files(repo)}
    assert set(env["sources"]) == {"cnnfast/ops.py", "setup.py"}
    assert collect_results.tree_differences(env, repo) == []
    (repo / "cnnfast" / "ops.py").write_text("v2, not committed\n")
    (repo / "cnnfast" / "new.py").write_text("new\n")
    (repo / "setup.py").unlink()
    env["sources"] = source_files(repo)
    assert collect_results.tree_differences(env, repo) == ["changed cnnfast/ops.py", "missing setup.py",
                                                           "extra cnnfast/new.py"]
    assert collect_results.tree_differences({**env, "commit": "0000000"}, repo) is None  # not in this repository
    assert collect_results.tree_differences({"commit": commit}, repo) is None  # an older record: no "sources"
    # collect refuses such a record, or files it as <commit>+changes when forced.
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "env.json").write_text(json.dumps(H200_ENV))
    monkeypatch.setattr(collect_results, "tree_differences", lambda env: ["changed cnnfast/ops.py"])
    with pytest.raises(SystemExit, match="differs from commit abc1234 \\(changed cnnfast/ops.py\\)"):
        collect(out, results=results)
    filed = collect(out, results=results, force=True)
    assert json.loads((filed / "env.json").read_text())["commit"] == "abc1234+changes"
    # The same record is still known as filed, and --replace files it in place of that copy.
    with pytest.raises(SystemExit, match=f"filed already, as {filed.name}"):
        collect(out, results=results, force=True)
    assert collect(out, results=results, force=True, replace=True) == filed
    assert [p.name for p in results.iterdir()] == [filed.name]
