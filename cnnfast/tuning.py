"""backend=None: the backend measured fastest for an op on this GPU and dtype.

The table (cnnfast/tuning.json) maps a GPU name to, per op and dtype, the backend that beat
PyTorch's own op in every case measured on that GPU; `python bench/tuning_table.py` rebuilds it
from the committed results in bench/results/. Anything not in the table, and every CPU tensor,
runs on the "torch" backend.
"""
import functools
import json
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuning.json")


@functools.lru_cache(maxsize=1)
def tuning_table() -> dict:
    return json.loads(TABLE_PATH.read_text()) if TABLE_PATH.is_file() else {}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def default_backend(op: str, x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "torch"
    by_op = tuning_table().get(_device_name(x.device.index or 0), {})
    return by_op.get(op, {}).get(str(x.dtype).removeprefix("torch."), "torch")
