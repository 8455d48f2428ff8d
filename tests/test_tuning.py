"""backend=None: the tuning table and the rule that builds it from committed GPU results."""
import json

import torch

from bench.tuning_table import build_table
from cnnfast import tuning
from cnnfast.backends import resolve_backend


def test_committed_table_is_the_one_the_results_give():
    assert json.loads(tuning.TABLE_PATH.read_text()) == build_table()


def test_table_entries_name_real_backends():
    for ops in tuning.tuning_table().values():
        for dtypes in ops.values():
            assert set(dtypes.values()) <= {"triton", "cuda"}


def test_cpu_and_meta_tensors_default_to_torch():
    for device in ("cpu", "meta"):
        assert resolve_backend("add_relu", torch.empty(1, device=device), None) == "torch"


def test_gpu_default_comes_from_the_table(monkeypatch):
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: {"NVIDIA H200": {"add_relu": {"bfloat16": "triton"}}})

    class FakeCudaTensor:
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16

    assert tuning.default_backend("add_relu", FakeCudaTensor()) == "triton"
    assert tuning.default_backend("gap_linear", FakeCudaTensor()) == "torch"
    FakeCudaTensor.dtype = torch.float16
    assert tuning.default_backend("add_relu", FakeCudaTensor()) == "torch"


def write_run(folder, cases):
    """A benchmarks.json with one case per (name, backend, speedup) in `cases`, bf16 on an H200."""
    folder.mkdir()
    benchmarks = [{"name": f"{name}[case{i}]", "extra_info": {"device": "NVIDIA H200", "dtype": "bf16",
                                                             "backend": backend, field: speedup}}
                  for i, (name, field, backend, speedup) in enumerate(cases)]
    (folder / "benchmarks.json").write_text(json.dumps({"benchmarks": benchmarks}))


def test_table_rule_every_case_faster_and_newest_run_wins(tmp_path):
    gap, conv = ("test_gap_linear_gpu", "speedup_vs_torch"), ("test_conv2d_layer", "speedup_vs_cudnn")
    write_run(tmp_path / "h200-2026-01-01-run1", [
        (*gap, "triton", 0.2), (*gap, "triton", 0.3),  # the old kernel: slower than torch
        (*conv, "triton", 1.2), (*conv, "triton", 0.9),  # faster on one layer only: stays on torch
        (*conv, "eager", 2.0),  # a PyTorch path of the benchmark, never a choice
    ])
    write_run(tmp_path / "h200-2026-02-01-run1", [
        (*gap, "triton", 1.1), (*gap, "triton", 1.3), (*gap, "cuda", 1.2), (*gap, "cuda", 1.25),
    ])
    # gap_linear: the newer run replaces the old Triton figures; then both backends beat torch in
    # every case and CUDA's median (1.225) beats Triton's (1.2). The convolution stays on torch.
    assert build_table(tmp_path) == {"NVIDIA H200": {"gap_linear": {"bfloat16": "cuda"}}}
