"""The Triton convolution's measured choices, kept on disk so that a later process starts at once.

The first call of a conv problem on a GPU tunes its kernels: the implicit GEMM's candidate tiles,
and where a TMA kernel takes the layer, that kernel's candidates, then one against the other
(conv2d.tma_choice). That is about a second per layer, tens of seconds for a network's first
forward pass, in every process. This file keeps what was measured, per GPU and problem (the
problem_key of conv2d.py without its device), as an entry

    {"tma": ["conv2d_spatial", "tma-2x8x8-128x64-g8-w8-s4"] or null (the implicit GEMM won),
     "implicit_gemm": "128x128x64-g8-w8-s3-split1"}

(either key may be missing: a layer no TMA kernel takes has no "tma"), and the launcher reads an
entry back before it would measure. Triton's own disk cache of tuning results cannot do this: it
leaves out configs with a pre-hook, as the TMA kernels' are, and knows nothing of the choice
between the two kernels.

The file is CNNFAST_KERNEL_CACHE (default ~/.cache/cnnfast/triton_conv2d.json); an empty value or
os.devnull keeps nothing (the test suite's setting). Each GPU's entries carry a fingerprint of the
kernels (the Triton version and the source of the files that define the kernels and their
candidates): entries under another fingerprint are never read, and the next write drops them; an
entry of any other shape than the above is not read either. Delete the file to measure everything
again.
"""
import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch
import triton

from cnnfast import json_file

KERNEL_FILES = ("conv2d.py", "conv2d_pointwise.py", "conv2d_spatial.py")


def cache_path() -> Path | None:
    """The file, or None when nothing is to be kept (also where there is no home directory to
    keep the default one in)."""
    path = os.environ.get("CNNFAST_KERNEL_CACHE")
    if path is None:
        try:
            return Path.home() / ".cache" / "cnnfast" / "triton_conv2d.json"
        except RuntimeError:
            return None
    return None if path in ("", os.devnull) else Path(path)


@functools.cache
def fingerprint() -> str:
    """What the entries were measured with: the Triton version and the source of KERNEL_FILES (the
    kernels and their candidate configs)."""
    digest = hashlib.sha256(triton.__version__.encode())
    for name in KERNEL_FILES:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()[:16]


def section_name(device: torch.device) -> str:
    """The file's section of a device: its GPU's name (or the device type off a GPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def well_formed_entry(stored) -> bool:
    """Whether a stored entry has the shape this module writes (a hand-edited or foreign file may not)."""
    if not isinstance(stored, dict) or not set(stored) <= {"tma", "implicit_gemm"}:
        return False
    tma_ok = "tma" not in stored or stored["tma"] is None or (
        isinstance(stored["tma"], list) and len(stored["tma"]) == 2 and all(isinstance(v, str) for v in stored["tma"]))
    return tma_ok and isinstance(stored.get("implicit_gemm", ""), str)


def current_section(contents: dict, gpu: str) -> dict:
    """The GPU's section of the file when it was written by these kernels, else a new, empty one."""
    section = contents.get(gpu)
    if (isinstance(section, dict) and section.get("kernels") == fingerprint()
            and isinstance(section.get("problems"), dict)):
        return section
    return {"kernels": fingerprint(), "problems": {}}


# The file's contents as this process last read or wrote them, per path.
_contents: dict[Path, dict] = {}


def _read(path: Path) -> dict:
    if path not in _contents:
        try:
            contents = json_file.read_object(path)
        except (OSError, ValueError) as error:
            warnings.warn(f"cnnfast: cannot read the kernel choices in {path} ({error}); measuring again")
            contents = {}
        _contents[path] = contents
    return _contents[path]


def entry(device: torch.device, problem: str) -> dict | None:
    """The stored entry of a problem on this device's GPU, or None (also for a malformed one)."""
    path = cache_path()
    if path is None:
        return None
    stored = current_section(_read(path), section_name(device))["problems"].get(problem)
    return stored if well_formed_entry(stored) else None


def store(device: torch.device, problem: str, new_entry: dict) -> None:
    """Records a problem's entry: under the file's lock, reads the file as it is now (other
    processes may have written to it since this one read it), adds the entry and writes it back."""
    path = cache_path()
    if path is None:
        return
    try:
        with json_file.locked(path):
            _contents.pop(path, None)
            contents = _read(path)
            gpu = section_name(device)
            section = current_section(contents, gpu)
            section["problems"][problem] = new_entry
            contents[gpu] = section
            json_file.write_object(path, contents)
    except OSError as error:
        warnings.warn(f"cnnfast: cannot keep the kernel choices in {path} ({error})")
