"""backend=None: the backend measured fastest for an op on this GPU, dtype and (for the
convolution) layer.

The table (cnnfast/tuning.json) maps a GPU name to, per op and dtype, the backend that beat
PyTorch's own op (for the convolution: cuDNN's bare convolution) in every case measured on that
GPU, and, under "conv2d_layers", per dtype and conv layer, the backend measured fastest for that
layer at each batch measured. `python -m bench.tuning_table` rebuilds it from the committed
results in bench/results/.

`cnnfast tune ARCH --batch B` measures the layers of an architecture on this machine's GPU and
merges its choices into a local table, CNNFAST_TUNING_FILE (default
~/.cache/cnnfast/tuning.json), whose entries override the packaged table's.

A convolution looks its layer up first, in its precision (float32 measured as TF32 apart from
IEEE float32: conv_dtype_key): same geometry (channels, input size, filter, stride,
padding, dilation), same epilogue after the bias (EPILOGUES: a ResNet block's last conv adds the
shortcut before its ReLU, its projection shortcut has no ReLU, and either changes which kernel
is fastest, since PyTorch runs the add and the ReLU as passes of their own) and a measured batch
within a factor of MAX_BATCH_RATIO of its own (the nearest one), where "torch" is a choice too;
then the op's entry; then "torch". Anything else not in the table, and every CPU tensor, runs on
the "torch" backend.
"""
import functools
import math
import os
import warnings
from pathlib import Path

import torch

from cnnfast import json_file
from cnnfast.precision import tf32_allowed

TABLE_PATH = Path(__file__).with_name("tuning.json")
CONV_LAYERS = "conv2d_layers"
# A layer's choice measured at batch b is used for batches b / 4 .. 4 b: beyond that the work per
# launch differs enough that the ranking of the kernels may change.
MAX_BATCH_RATIO = 4
# A kernel replaces PyTorch on a layer only when it is at least this much faster (timing noise
# on a GPU is about 1-2 %; a tie stays with PyTorch, the reference).
MIN_LAYER_SPEEDUP = 1.03


# A convolution's epilogue after the bias, by name: (adds a residual, applies a ReLU after it).
EPILOGUES = {"none": (False, False), "relu": (False, True), "residual": (True, False), "residual+relu": (True, True)}
_EPILOGUE_NAMES = {parts: name for name, parts in EPILOGUES.items()}


def epilogue_name(residual: bool, relu: bool) -> str:
    """EPILOGUES' name of a convolution's epilogue: "residual+relu" for a ResNet block's last conv
    (a lookup: every conv2d call with backend=None asks)."""
    return _EPILOGUE_NAMES[(bool(residual), bool(relu))]


def conv2d_layer_key(c, h, w, k, r, s, stride, padding, dilation, epilogue: str) -> str:
    """The table's name for a conv layer's geometry and epilogue (the batch is kept apart)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown conv epilogue {epilogue!r}; expected one of {', '.join(EPILOGUES)}")
    return (f"c{c} h{h} w{w} k{k} r{r} s{s} stride{stride[0]}x{stride[1]} "
            f"pad{padding[0]}x{padding[1]} dil{dilation[0]}x{dilation[1]} {epilogue}")


def dtype_key(dtype: torch.dtype) -> str:
    """The table's name for a dtype: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def conv_dtype_key(dtype: torch.dtype, tf32: bool) -> str:
    """The table's name for the precision a convolution runs in: dtype_key's, and "float32 as tf32"
    for float32 computed as TF32 (on the tensor cores, where IEEE float32 is not: the fastest
    kernel may differ)."""
    return "float32 as tf32" if dtype == torch.float32 and tf32 else dtype_key(dtype)


def fastest_layer_backend(times_ms: dict) -> str | None:
    """The layer rule: of the backends timed on one layer and batch ({backend: ms}), the fastest
    if it beats "torch" by MIN_LAYER_SPEEDUP, else "torch"; None when torch was not timed."""
    if "torch" not in times_ms:
        return None
    backend = min(times_ms, key=times_ms.get)
    return backend if times_ms["torch"] >= MIN_LAYER_SPEEDUP * times_ms[backend] else "torch"


def local_table_path() -> Path:
    """Where `cnnfast tune` keeps this machine's measurements."""
    return Path(local_table_name())


def local_table_name() -> str:
    """local_table_path() as a string, worked out once per CNNFAST_TUNING_FILE setting and home
    directory: every call with backend=None asks, and Path.home() alone takes about 15 us."""
    return _local_table_name(os.environ.get("CNNFAST_TUNING_FILE"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _local_table_name(setting: str | None, home: str | None) -> str:
    if setting == "":  # set but empty: no local table, as /dev/null
        return os.devnull
    return setting if setting is not None else str(Path.home() / ".cache" / "cnnfast" / "tuning.json")


def read_table(path: Path) -> dict:
    """A table file's contents ({} where there is none); a ValueError naming a malformed one."""
    return json_file.read_object(path)


def merged(base: dict, override: dict) -> dict:
    """base with override's entries laid over it, nested dicts merged key by key."""
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


@functools.lru_cache(maxsize=None)
def _table_at(local_path: str) -> dict:
    """The packaged table with the local one over it; a local table that cannot be read or is not
    shaped as `cnnfast tune` writes it is left out, with one warning (read once per path)."""
    local, problem = read_usable_table(Path(local_path))
    if problem:
        warnings.warn(f"cnnfast: the local tuning table {local_path} is left out ({problem}); "
                      "backend=None uses the packaged table")
        local = {}
    return merged(read_table(TABLE_PATH), local)


def read_usable_table(path: Path) -> tuple[dict, str | None]:
    """(the table file's contents, None), or ({}, what makes it unusable: unreadable or misshapen)."""
    try:
        table = read_table(path)
    except ValueError as error:
        return {}, str(error)
    problem = shape_problem(table)
    return ({}, problem) if problem else (table, None)


def shape_problem(table: dict) -> str | None:
    """What in a table is not shaped as {gpu: {op: {dtype: backend}, CONV_LAYERS: {dtype: {layer
    key: {batch: backend}}}}}, or None."""
    for gpu, entries in table.items():
        if not isinstance(entries, dict):
            return f"{gpu!r} holds a {type(entries).__name__}, not a dict"
        for op, by_dtype in entries.items():
            if not isinstance(by_dtype, dict):
                return f"{gpu!r}/{op!r} holds a {type(by_dtype).__name__}, not a dict"
            for dtype, value in by_dtype.items():
                if op != CONV_LAYERS:
                    if not isinstance(value, str):
                        return f"{gpu!r}/{op!r}/{dtype!r} is not a backend name"
                    continue
                for key, by_batch in (value.items() if isinstance(value, dict) else [(None, None)]):
                    if not (isinstance(by_batch, dict) and all(
                            isinstance(batch, str) and batch.isdigit() and isinstance(backend, str)
                            for batch, backend in by_batch.items())):
                        return f"{gpu!r}/{CONV_LAYERS}/{dtype!r}/{key!r} is not {{batch: backend}}"
    return None


def tuning_table() -> dict:
    """The packaged table with the local one (cnnfast tune's) over it; read once per local path
    (save_local_choices rereads it)."""
    return _table_at(local_table_name())


NO_LOCAL_TABLE = "CNNFAST_TUNING_FILE is empty or /dev/null: there is no local tuning table to save to"


def local_table_problem() -> str | None:
    """Why save_local_choices could not write the local table, or None; `cnnfast tune` asks before
    it measures. The table's directory is created here; the table is replaced by a rename from a
    file written in that directory, under its lock file, so both are tried."""
    path = local_table_path()
    if str(path) == os.devnull:
        return NO_LOCAL_TABLE
    if path.is_dir():
        return f"the local tuning table {path} (CNNFAST_TUNING_FILE) is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the directory of the local tuning table {path} (CNNFAST_TUNING_FILE): {error.strerror or error}"
    problem = (json_file.write_problem(path.parent, directory=True)
               or json_file.write_problem(path.with_name(path.name + ".lock")))
    if problem:
        return f"cannot write the local tuning table {path} (CNNFAST_TUNING_FILE): {problem}"
    return None


def save_local_choices(choices: dict) -> Path:
    """Merges choices (a table fragment) into the local table, under its lock (two `cnnfast tune`
    runs may finish together), and makes backend=None use it now."""
    path = local_table_path()
    if str(path) == os.devnull:
        raise ValueError(NO_LOCAL_TABLE)
    with json_file.locked(path):
        existing, problem = read_usable_table(path)
        if problem:  # kept for a look, not lost, and not in the way of what was just measured
            aside = path.with_name(f"{path.name}.unreadable")
            path.replace(aside)
            warnings.warn(f"cnnfast: the local tuning table {path} ({problem}) was moved to {aside}; writing a new one")
            existing = {}
        json_file.write_object(path, merged(existing, choices))
    _table_at.cache_clear()
    _layer_backend.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=4096)
def _layer_backend(local_path: str, gpu: str, dtype: str, key: str, batch: int) -> str | None:
    """The table's choice for the layer at the nearest measured batch, or None. local_path is the
    cache's key only (tuning_table reads the table at that path): another table, another lookup."""
    by_batch = tuning_table().get(gpu, {}).get(CONV_LAYERS, {}).get(dtype, {}).get(key, {})
    distance = {measured: abs(math.log(max(batch, 1) / int(measured))) for measured in by_batch}
    # The nearest measured batch; of two as near, the smaller (a stable choice, whatever the file's order).
    nearest = min(distance, key=lambda measured: (distance[measured], int(measured)), default=None)
    if nearest is None or distance[nearest] > math.log(MAX_BATCH_RATIO):
        return None
    return by_batch[nearest]


def table_choice(op: str, device_index: int, dtype: str, layer_key: str | None, batch: int) -> str:
    """The table's backend for op on GPU device_index and dtype (and, for a convolution, its layer
    and batch); "torch" when unmeasured."""
    gpu = _device_name(device_index)
    if layer_key is not None:
        chosen = _layer_backend(local_table_name(), gpu, dtype, layer_key, batch)
        if chosen is not None:
            return chosen
    return tuning_table().get(gpu, {}).get(op, {}).get(dtype, "torch")


def default_backend(op: str, x: torch.Tensor, layer: tuple | None = None) -> str:
    """The table's backend for op on x's GPU and dtype; "torch" on a CPU or when unmeasured.
    layer: for conv2d, (weight shape, stride, padding, dilation, epilogue name) of the call.
    The ops ask when their kernel runs, with real sizes (cnnfast.backends.AUTO), never while a call is traced."""
    if x.device.type != "cuda":
        return "torch"
    layer_key, dtype = None, dtype_key(x.dtype)
    if layer is not None:
        (k, c, r, s), stride, padding, dilation, epilogue = layer
        layer_key = conv2d_layer_key(c, x.shape[2], x.shape[3], k, r, s, stride, padding, dilation, epilogue)
        dtype = conv_dtype_key(x.dtype, x.dtype == torch.float32 and tf32_allowed("conv"))
    return table_choice(op, x.device.index or 0, dtype, layer_key, x.shape[0])
