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
