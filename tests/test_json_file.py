"""The JSON files that several processes update: the kernel choices, the local tuning table and the
roofline ceilings. Each test starts several processes that update one file at once, each one slow
between its read and its write (as a process measuring or compiling is), and checks that no
update is lost."""
import json
import multiprocessing
import time

import pytest
import torch

from cnnfast import json_file, roofline, tuning
from cnnfast.triton_kernels import choice_cache

PROCESSES, UPDATES = 4, 8
# Forked workers inherit the test's monkeypatching and its environment.
FORK = multiprocessing.get_context("fork")


def run_at_once(work) -> None:
    """Runs work(worker) in PROCESSES processes at once; fails if any of them fails."""
    workers = [FORK.Process(target=work, args=(index,)) for index in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES


def slow_json_reads(monkeypatch) -> None:
    """Every read of a JSON file takes 20 ms longer: without the lock, another process's write
    would land between a read and the write that follows it."""
    read = json_file.read_object

    def slow_read(path):
        contents = read(path)
        time.sleep(0.02)
        return contents

    monkeypatch.setattr(json_file, "read_object", slow_read)


def test_concurrent_kernel_choices_are_all_kept(monkeypatch, tmp_path):
    path = tmp_path / "triton_conv2d.json"
    monkeypatch.setenv("CNNFAST_KERNEL_CACHE", str(path))
    monkeypatch.setattr(choice_cache, "_contents", {})
    slow_json_reads(monkeypatch)

    def store_entries(worker):
        for update in range(UPDATES):
            choice_cache.store(torch.device("cpu"), f"problem {worker}-{update}", {"implicit_gemm": "a config"})

    run_at_once(store_entries)
    problems = json.loads(path.read_text())["cpu"]["problems"]
    assert set(problems) == {f"problem {w}-{u}" for w in range(PROCESSES) for u in range(UPDATES)}


def test_concurrent_local_tuning_choices_are_all_kept(monkeypatch, tmp_path):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(path))
    slow_json_reads(monkeypatch)

    def save_choices(worker):
        for update in range(UPDATES):
            tuning.save_local_choices({"a GPU": {"conv2d": {f"dtype {worker}-{update}": "triton"}}})

    run_at_once(save_choices)
    tuning._table_at.cache_clear()
    assert set(json.loads(path.read_text())["a GPU"]["conv2d"]) == {
        f"dtype {w}-{u}" for w in range(PROCESSES) for u in range(UPDATES)}


def test_processes_needing_the_ceilings_at_once_measure_them_once(monkeypatch, tmp_path):
    """Measuring at once, each process would find a fraction of the machine, and the low ceilings
    would stay cached."""
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    measured = tmp_path / "measurements"
    ceiling = {"device": "cpu", "dtype": "fp32", "matmul_flop_per_s": 1e11, "copy_bytes_per_s": 1e10,
               "method": roofline.CEILING_METHOD, "measured_at": "now"}

    def measure(device, dtype):
        with open(measured, "a") as log:
            log.write("measured\n")
        time.sleep(0.2)
        return ceiling

    monkeypatch.setattr(roofline, "measure_ceilings", measure)

    def read_ceilings(worker):
        assert roofline.ceilings("cpu", torch.float32) == ceiling

    run_at_once(read_ceilings)
    assert measured.read_text() == "measured\n"


def test_a_malformed_ceilings_cache_is_measured_again_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    (tmp_path / "ceilings.json").write_text('{"cpu / fp32": ')  # a write cut short
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, dtype: {"method": roofline.CEILING_METHOD})
    with pytest.warns(UserWarning, match="ceilings.json is not valid JSON"):
        assert roofline.ceilings("cpu", torch.float32) == {"method": roofline.CEILING_METHOD}
    assert json.loads((tmp_path / "ceilings.json").read_text()) == {
        f"{roofline.device_name('cpu')} / fp32": {"method": roofline.CEILING_METHOD}}


@pytest.mark.parametrize("text, problem", [("[1, 2]", "holds a JSON list, not an object"),
                                           ('{"a": ', "is not valid JSON")])
def test_read_object_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"table.json {problem}"):
        json_file.read_object(path)


def test_a_malformed_local_tuning_table_is_named(monkeypatch, tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("not JSON")
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(path))
    with pytest.warns(UserWarning, match="tuning.json is not valid JSON.*moved to .*tuning.json.unreadable"):
        tuning.save_local_choices({"a GPU": {}})
    # Kept for its owner to look at, not overwritten; what was measured is saved beside it.
    assert (tmp_path / "tuning.json.unreadable").read_text() == "not JSON"
    assert json.loads(path.read_text()) == {"a GPU": {}}


def test_written_files_are_sorted_readable_by_all_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "file.json"
    json_file.write_object(path, {"b": 1, "a": {"d": 2, "c": 3}})
    assert path.read_text() == '{\n "a": {\n  "c": 3,\n  "d": 2\n },\n "b": 1\n}\n'
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]
