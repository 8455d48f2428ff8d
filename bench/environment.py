"""Writes the facts a GPU measurement is quoted with (device, versions, commit, date) as JSON.

    python bench/environment.py OUT.json      (CNNFAST_COMMIT names the commit measured)
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import torch
import triton


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    return subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()


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
    }


if __name__ == "__main__":
    info = environment()
    with open(sys.argv[1], "w") as f:
        json.dump(info, f, indent=1)
    print(info)
