"""JSON files that several processes update: the kernel choices, the local tuning table and the
roofline ceilings, all under ~/.cache/cnnfast by default.

An update holds an exclusive lock (flock on a neighbouring ".lock" file) from its read to its
write, so that two processes take turns instead of each writing back what it read and losing the
other's entry; the write goes to a temporary file that then replaces the old one, so that a reader
never sees half a file.
"""
import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path):
    """Holds the update lock of path for the block (waiting while another process holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def write_problem(path: Path, directory: bool = False) -> str | None:
    """Why path (a file, or with directory=True a directory to write in) cannot be written, found by
    writing, since os.access says yes to root and on special filesystems (/proc): a temporary file
    in the directory, or opening an existing regular file for appending (which changes nothing). A
    pipe or a device is not opened (that would block, or end a reader's input): os.access decides."""
    try:
        if not directory and path.exists():
            if path.is_dir():
                return "it is a directory"
            if not path.is_file():
                return None if os.access(path, os.W_OK) else "permission denied"
            with open(path, "a"):
                return None
        # A link to a file not there yet is written through: its target's directory is the one.
        with tempfile.TemporaryFile(dir=path if directory else Path(os.path.realpath(path)).parent):
            return None
    except OSError as error:
        return error.strerror or str(error)


def read_object(path: Path) -> dict:
    """The JSON object in path, {} where there is no file; a ValueError naming the file where it
    holds something else."""
    if not path.is_file():
        return {}
    try:
        contents = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(contents, dict):
        raise ValueError(f"{path} holds a JSON {type(contents).__name__}, not an object")
    return contents


def write_object(path: Path, contents: dict) -> None:
    """Replaces path with contents (sorted keys, one-space indent), atomically."""
    replace_text(path, json.dumps(contents, indent=1, sort_keys=True) + "\n")


def replace_text(path: Path, text: str) -> None:
    """Replaces path with text, atomically: a reader, or a process stopped while writing, finds the
    old file or the new one whole."""
    written = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as file:
            written = Path(file.name)
            file.write(text)
        written.chmod(0o644)  # as a file written plainly would be (the temporary one is owner-only)
        os.replace(written, path)
        written = None
    finally:
        if written is not None:
            written.unlink(missing_ok=True)
