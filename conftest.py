"""Test and benchmark setup: without a GPU, Triton runs under its interpreter (the variable must be set before
triton is first imported), and tests marked `gpu` are skipped. backend=None reads the committed tuning table
only, unless CNNFAST_TUNING_FILE names a local one (device_check.sh does, for the tables it measures): a
local table that `cnnfast tune` left on this machine would make runs depend on it."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CNNFAST_TUNING_FILE", os.devnull)  # not a regular file: read as an empty table


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
