"""The roofline model of the conv layers: measured ceilings, bound times and the roofline chart.

Ceilings, measured once per device and dtype (``ceilings``), cached in
``$CNNFAST_CACHE_DIR/ceilings.json`` (default ``~/.cache/cnnfast/ceilings.json``):

- ``matmul_flop_per_s``: a large square matrix product in the dtype, 2*n^3 FLOPs, timed both as
  ``torch.matmul`` and as the same product written as a 1x1 convolution over n pixels, channels_last
  (``matmul_op`` says which was faster): the convolutions may reach the machine's peak through
  another library than the matmul (on a CPU, oneDNN against MKL: 4x faster on a 2-core AMD EPYC);
- ``copy_bytes_per_s``: a large tensor copy, counting the bytes read and the bytes written;
- ``method``: how each was timed (CEILING_METHOD): the fastest of several runs, since a ceiling
  is what the device can do and a run slowed by other work on the machine says nothing of that.
  A cached entry timed another way is measured again.

Counting, per conv layer at batch N (input C x H x W, K filters of C x R x S, output K x P x Q):

- ``flops`` = 2 * MACs = 2 * N * K * P * Q * C * R * S (as ``cnnfast.ops.conv2d_flops``);
- ``bytes`` (compulsory traffic) = (N*C*H'*W' input + K*C*R*S weights + N*K*P*Q output
  [+ N*K*P*Q residual]) * element size of the dtype: each tensor read or written once, where H'
  and W' count the input rows and columns some filter tap reads (H and W, but where the stride
  steps over some: a 1x1 stride-2 layer reads a quarter of its input). The folded
  BatchNorm bias (K float32 values) is not counted: under 1% of a layer's traffic in these
  architectures (about 0.6% at most, at batch 1 in bfloat16; less at larger batches);
- ``intensity`` = flops / bytes (FLOP/byte);
- ``bound_ms`` = max(flops / matmul_flop_per_s, bytes / copy_bytes_per_s): the fastest time the
  ceilings allow; ``bound`` is "compute" when the flops term is at least the bytes term, else "memory"
  (a layer's intensity above the ridge point, matmul_flop_per_s / copy_bytes_per_s, is compute-bound);
- given a measured time: ``achieved_flop_per_s`` = flops / time and ``percent_of_bound`` =
  100 * bound_ms / ms (100 means the layer runs at its roof).

Timing (``time_ms``): on a GPU, ``triton.testing.do_bench`` (CUDA events, median, L2 flushed);
on a CPU, the median of ``time.perf_counter`` runs after warm-up. CPU figures are CPU figures.

``roofline.json`` (``roofline_json``), schema "cnnfast.roofline/5"::

    {"schema", "arch", "batch", "input_size", "dtype", "device",
     "ceilings": {"device", "dtype", "tf32", "matmul_flop_per_s", "matmul_op", "matmul_dtype", "copy_bytes_per_s",
                  "method", "measured_at"},
     "ridge_intensity",
     "points": [{"layer", "backend", "flops", "bytes", "intensity", "bound_ms", "bound",
                 "ms", "achieved_flop_per_s", "percent_of_bound", "kernel"}]}

``kernel`` names what ran on the triton, cuda and torch_triton backends (the tuned Triton config,
the CUTLASS kernel and tile, the epilogue's tuned tile; ``cnnfast.bench.kernel_name``), null for
the PyTorch paths.
"""
import contextlib
import datetime
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from cnnfast import json_file
from cnnfast.ops import conv2d_flops, conv2d_output_size
from cnnfast.precision import tf32_allowed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROOFLINE_SCHEMA = "cnnfast.roofline/5"
# Square matmul size and copy size of the ceiling measurements (a CPU run takes ~0.1-0.3 s).
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"CPU {model}, {torch.get_num_threads()} threads"


def rate_unit(device: torch.device) -> tuple[str, float]:
    """FLOP/s unit of the tables and charts: TFLOP/s on a GPU, GFLOP/s on a CPU."""
    return ("TFLOP/s", 1e12) if torch.device(device).type == "cuda" else ("GFLOP/s", 1e9)


# ---------------------------------------------------------------- timing


CPU_WARMUP, CPU_REPS = 2, 5


def time_ms(fn, device, *, warmup: int = CPU_WARMUP, reps: int = CPU_REPS, fastest: bool = False) -> float:
    """Milliseconds of one fn() call, the median (or with fastest=True the minimum) of its runs:
    CUDA events (do_bench, L2 flushed) or CPU perf_counter."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="min" if fastest else "median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (min(times) if fastest else statistics.median(times)) * 1e3


@contextlib.contextmanager
def cudnn_autotuned():
    """torch.backends.cudnn.benchmark set for the duration (restored after): cuDNN times its
    algorithms for each new shape and keeps the fastest, as Triton's kernels are autotuned, so a
    cuDNN baseline is cuDNN at its best."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def timer_description(device) -> str:
    if torch.device(device).type == "cuda":
        return "triton.testing.do_bench: CUDA events, median, L2 flushed"
    return f"CPU time.perf_counter: median of {CPU_REPS} runs after {CPU_WARMUP} warm-up runs"


# ---------------------------------------------------------------- ceilings


# The ceilings' timing: the fastest of CEILING_REPS runs after CEILING_WARMUP (CUDA: do_bench's
# fastest). Stored with each cached entry; an entry timed otherwise is measured again.
CEILING_WARMUP, CEILING_REPS = 2, 10
CEILING_METHOD = (f"fastest of {CEILING_REPS} runs after {CEILING_WARMUP} warm-up runs (CUDA: do_bench, min); "
                  "matmul in the convolutions' precision, the faster of torch.matmul and a 1x1 conv2d "
                  "(CPU half dtypes: or float32's, if faster); "
                  "raised when a layer beats its bound")


def tf32_convolutions(device, dtype) -> bool:
    """Whether float32 convolutions on device run as TF32: cuDNN's, Triton's and CUTLASS's follow
    PyTorch's convolution setting (TF32 by default), while torch.matmul follows its own (IEEE by
    default), so the matmul ceiling is timed with the convolutions' precision, like for like."""
    return torch.device(device).type == "cuda" and dtype == torch.float32 and tf32_allowed("conv")


@contextlib.contextmanager
def matmul_in_convolution_precision(device, dtype):
    """torch.matmul on device set to the convolutions' precision (tf32_convolutions) for the
    duration, and its own setting restored after. Through the legacy flag where it answers, since
    it keeps PyTorch's two matmul settings in step (torch.backends.cuda.matmul.fp32_precision set
    alone leaves torch.get_float32_matmul_precision() and the flag raising, seen in torch 2.11 and
    2.14); through fp32_precision where the caller's settings already make the flag raise."""
    matmul = torch.backends.cuda.matmul
    try:
        before, setting = matmul.allow_tf32, "allow_tf32"
    except RuntimeError:
        before, setting = matmul.fp32_precision, "fp32_precision"
    if torch.device(device).type == "cuda":
        tf32 = tf32_convolutions(device, dtype)
        setattr(matmul, setting, tf32 if setting == "allow_tf32" else "tf32" if tf32 else "ieee")
    try:
        yield
    finally:
        setattr(matmul, setting, before)


def measure_ceilings(device="cpu", dtype=torch.float32) -> dict:
    """Peak matmul FLOP/s (in the convolutions' precision: tf32_convolutions) and copy bandwidth
    (bytes read + written per second) of device in dtype. The product is timed as torch.matmul and
    as a 1x1 convolution (MATMUL_OPS), the faster kept, matmul_op saying which: on a CPU, PyTorch's
    convolutions run on oneDNN and its matmul on MKL, which ran 4x slower on a 2-core AMD EPYC, so a
    roof from torch.matmul alone lay far under the convolutions it bounds. On a CPU a float16 or
    bfloat16 product may also take a slow path (PyTorch's float16 CPU matmul ran at 1/80 of the
    float32 one on that machine): there float32's is timed too, and matmul_dtype says which dtype won."""
    device = torch.device(device)
    n = MATMUL_SIZE[device.type]
    timing = dict(warmup=CEILING_WARMUP, reps=CEILING_REPS, fastest=True)
    candidates = [dtype] if device.type == "cuda" or dtype == torch.float32 else [dtype, torch.float32]
    product_ms = {}  # (op, dtype): ms
    for matmul_dtype in candidates:
        a = torch.randn(n, n, device=device).to(matmul_dtype)
        b = torch.randn(n, n, device=device).to(matmul_dtype)
        with matmul_in_convolution_precision(device, dtype):
            for op, product in MATMUL_OPS.items():
                product_ms[op, matmul_dtype] = time_ms(product(a, b), device, **timing)
    (op, fastest), ms = min(product_ms.items(), key=lambda item: item[1])
    source = torch.empty(COPY_BYTES[device.type], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), device, **timing)
    return {
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "tf32": tf32_convolutions(device, dtype),
        "matmul_flop_per_s": 2 * n**3 / (ms * 1e-3),
        "matmul_op": op,
        "matmul_dtype": dtype_name(fastest),
        "copy_bytes_per_s": 2 * source.numel() / (copy_ms * 1e-3),
        "method": CEILING_METHOD,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def matmul_as_conv2d(a, b):
    """a @ b (n x n each) as a 1x1 convolution: a's rows are n pixels (a 32 x n/32 map) of n channels,
    already channels_last in memory; b's columns are the n filters."""
    n = a.shape[0]
    x = a.view(1, 32, n // 32, n).permute(0, 3, 1, 2)
    weight = b.t().contiguous().view(n, n, 1, 1)
    return lambda: torch.nn.functional.conv2d(x, weight)


# The two ways the ceiling's product is timed: name -> (a, b) -> a function to time.
MATMUL_OPS = {"torch.matmul": lambda a, b: lambda: torch.matmul(a, b), "1x1 conv2d": matmul_as_conv2d}


def cache_path() -> Path:
    directory = os.environ.get("CNNFAST_CACHE_DIR") or Path.home() / ".cache" / "cnnfast"
    return Path(directory) / "ceilings.json"


def ceilings(device="cpu", dtype=torch.float32) -> dict:
    """The ceilings of device and dtype, measured on first use (or where the cached entry was timed
    by another method) and read from the cache afterwards. The cache's lock is held while measuring:
    two processes that would measure at once (the test suite's workers) would each find half the
    machine, and the low ceilings would stay cached; the second one waits and reads the first's."""
    return _cached_ceilings(device, dtype, measure_again=False)


def remeasured_ceilings(device="cpu", dtype=torch.float32) -> dict:
    """The ceilings measured again, each the higher of the cached and the new figure, cached: a
    ceiling first measured while the machine was busy stays too low otherwise, and puts measured
    layers above the roof."""
    return _cached_ceilings(device, dtype, measure_again=True)


# Ceilings this process measured but could not write to the cache, by (cache path, ceiling key):
# kept here instead, so that a cache that cannot be used costs one measurement per process, not
# one per call.
_unkept_ceilings: dict = {}


def _cached_ceilings(device, dtype, measure_again: bool) -> dict:
    """The cached entry of device and dtype where it was timed by CEILING_METHOD and measure_again is
    False; else a new measurement (each figure raised to the cached one's where that is higher),
    cached. All under the cache's lock. A cache that cannot be used (its directory cannot be made
    or written) leaves a warning, and the figures are kept in this process only."""
    path = cache_path()
    key = ceiling_key(device, dtype)
    unkept = _unkept_ceilings.setdefault(str(path), {})
    with contextlib.ExitStack() as lock:
        try:
            lock.enter_context(json_file.locked(path))
        except OSError as error:
            if key not in unkept:
                warnings.warn(f"cnnfast: cannot use the ceilings cache {path} ({error.strerror or error}); "
                              "the ceilings are kept in this process only (CNNFAST_CACHE_DIR names another place)")
            return _updated(unkept, key, device, dtype, measure_again)
        try:
            cached = json_file.read_object(path)
        except (ValueError, OSError) as error:
            warnings.warn(f"cnnfast: cannot read the cached ceilings ({error}); measuring again")
            cached = {}
        if key not in cached and key in unkept:  # an earlier call could not write them
            cached[key] = unkept[key]
        before = cached.get(key)
        fresh = _updated(cached, key, device, dtype, measure_again)
        if fresh is before:  # read, not measured: nothing to write
            return fresh
        try:
            json_file.write_object(path, cached)
        except OSError as error:
            warnings.warn(f"cnnfast: cannot write the ceilings cache {path} ({error.strerror or error}); "
                          "the ceilings are kept in this process only")
            unkept[key] = fresh
    return fresh


def _updated(table: dict, key: str, device, dtype, measure_again: bool) -> dict:
    """table[key] where it was timed by CEILING_METHOD and measure_again is False; else a new
    measurement, each figure raised to table[key]'s where that is higher, stored in table."""
    old = table.get(key, {})
    current = old.get("method") == CEILING_METHOD
    if current and not measure_again:
        return old
    fresh = measure_ceilings(device, dtype)
    if current:
        if old["matmul_flop_per_s"] > fresh["matmul_flop_per_s"]:
            fresh.update(matmul_flop_per_s=old["matmul_flop_per_s"], matmul_op=old["matmul_op"],
                         matmul_dtype=old["matmul_dtype"])
        fresh["copy_bytes_per_s"] = max(fresh["copy_bytes_per_s"], old["copy_bytes_per_s"])
    table[key] = fresh
    return fresh


def ceiling_key(device, dtype) -> str:
    """The cache's name for the ceilings of device and dtype; float32 timed as TF32 apart."""
    return f"{device_name(device)} / {dtype_name(dtype)}{' as tf32' if tf32_convolutions(device, dtype) else ''}"


def ridge_intensity(ceiling: dict) -> float:
    """FLOP/byte where the bandwidth slope meets the compute ceiling."""
    return ceiling["matmul_flop_per_s"] / ceiling["copy_bytes_per_s"]


# ---------------------------------------------------------------- the model


def conv_shapes(problem, batch: int) -> tuple[tuple, tuple]:
    """(input shape, weight shape) of one ConvProblem at batch N."""
    return (batch, problem.C, problem.H, problem.W), (problem.K, problem.C, problem.R, problem.S)


def conv_flops(problem, batch: int) -> int:
    """2 * MACs of one ConvProblem at batch N."""
    return conv2d_flops(*conv_shapes(problem, batch), problem.stride, problem.padding, (1, 1))


def lines_read(size: int, out: int, kernel: int, stride: int, padding: int) -> int:
    """How many of an input axis's `size` rows (or columns) some filter tap reads: all of them,
    but where the stride steps over some (a 1x1 filter at stride 2 reads every other one)."""
    return len({o * stride - padding + k for o in range(out) for k in range(kernel)} & set(range(size)))


def conv_bytes(problem, batch: int, element_size: int, residual: bool = False) -> int:
    """Compulsory traffic: the input pixels the filter reads, the weights, the output (and a
    residual), each moved once."""
    x_shape, w_shape = conv_shapes(problem, batch)
    p, q = conv2d_output_size("conv", x_shape, w_shape, problem.stride, problem.padding, (1, 1))
    (stride_h, stride_w), (pad_h, pad_w) = problem.stride, problem.padding
    rows, columns = (lines_read(problem.H, p, problem.R, stride_h, pad_h),
                     lines_read(problem.W, q, problem.S, stride_w, pad_w))
    output = batch * problem.K * p * q
    elements = batch * problem.C * rows * columns + math.prod(w_shape) + output
    return (elements + (output if residual else 0)) * element_size


def bound_seconds(flops: float, traffic: float, ceiling: dict) -> float:
    return max(flops / ceiling["matmul_flop_per_s"], traffic / ceiling["copy_bytes_per_s"])


def bound_kind(flops: float, traffic: float, ceiling: dict) -> str:
    compute = flops / ceiling["matmul_flop_per_s"]
    return "compute" if compute >= traffic / ceiling["copy_bytes_per_s"] else "memory"


def roofline_point(layer: str, backend: str, flops: int, traffic: int, ms: float, ceiling: dict,
                   kernel: str | None = None) -> dict:
    """One layer timed on one backend, placed under the roof (the "points" rows of roofline.json)."""
    bound_ms = bound_seconds(flops, traffic, ceiling) * 1e3
    return {
        "layer": layer,
        "backend": backend,
        "flops": flops,
        "bytes": traffic,
        "intensity": flops / traffic,
        "bound_ms": bound_ms,
        "bound": bound_kind(flops, traffic, ceiling),
        "ms": ms,
        "achieved_flop_per_s": flops / (ms * 1e-3),
        "percent_of_bound": 100 * bound_ms / ms,
        "kernel": kernel,
    }


def roofline_json(arch: str, batch: int, input_size: int, ceiling: dict, points: list[dict]) -> dict:
    return {
        "schema": ROOFLINE_SCHEMA,
        "arch": arch,
        "batch": batch,
        "input_size": input_size,
        "dtype": ceiling["dtype"],
        "device": ceiling["device"],
        "ceilings": ceiling,
        "ridge_intensity": ridge_intensity(ceiling),
        "points": points,
    }


def roofline_rows(points: list[dict], rate=("GFLOP/s", 1e9)) -> tuple[tuple, list[tuple]]:
    """(headers, rows) of the roofline table: one row per point."""
    unit, scale = rate
    headers = ("layer", "backend", "FLOP/byte", "bound ms", "ms", f"achieved {unit}", "% of bound", "bound by",
               "kernel")
    rows = [
        (point["layer"], point["backend"], f"{point['intensity']:.1f}", f"{point['bound_ms']:.3f}",
         f"{point['ms']:.3f}", f"{point['achieved_flop_per_s'] / scale:,.1f}", f"{point['percent_of_bound']:.1f}",
         point["bound"], point["kernel"] or "")
        for point in points
    ]
    return headers, rows


# ---------------------------------------------------------------- the chart

MARKERS = ("o", "s", "^", "D", "v", "P")
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# What a point above the roof outran, by the bound the roofline gives it.
CEILING_NAMES = {"compute": "matmul ceiling", "memory": "copy bandwidth"}


def above_roof_note(points) -> str | None:
    """The chart's note on points above the roof: which measured ceiling they outran (the matmul
    peak under a compute-bound point, the copy bandwidth under a memory-bound one); None if none did."""
    above = {point["bound"] for point in points if point["percent_of_bound"] > 100}
    if not above:
        return None
    return f"Points above the roof outran the measured {' or '.join(CEILING_NAMES[bound] for bound in sorted(above))}."


def layer_labels(points: list[dict], layers: list[str], scale: float) -> list[tuple[tuple, list[str]]]:
    """(point, numbers) of the roofline's labels: each layer's number (its place in layers, from 1)
    goes beside its first point; layers whose first points (nearly) coincide share one label."""
    labels = []  # [(log x, log y), (x, y), numbers]
    for number, layer in enumerate(layers, 1):
        point = next(point for point in points if point["layer"] == layer)
        xy = (point["intensity"], point["achieved_flop_per_s"] / scale)
        spot = (math.log10(xy[0]), math.log10(xy[1]))
        # Within about a label's size of another, in decades of the log axes.
        near = next((label for label in labels if abs(label[0][0] - spot[0]) < 0.08 and abs(label[0][1] - spot[1]) < 0.04), None)
        if near is None:
            labels.append((spot, xy, [str(number)]))
        else:
            near[2].append(str(number))
    return [(xy, numbers) for _, xy, numbers in labels]


def roofline_plot(points: list[dict], ceiling: dict, path, subject: str = "", rate=("GFLOP/s", 1e9)):
    """Log-log roofline PNG: the roof, the ridge point and each layer per backend, each layer numbered
    beside its first point and named in a key."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    unit, scale = rate
    peak, bandwidth, ridge = ceiling["matmul_flop_per_s"], ceiling["copy_bytes_per_s"], ridge_intensity(ceiling)
    intensities = [point["intensity"] for point in points] or [ridge]
    low, high = min(min(intensities), ridge) / 3, max(max(intensities), ridge) * 3
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    axes = figure.add_subplot()
    xs = [low, ridge, high]
    axes.plot(xs, [min(peak, bandwidth * x) / scale for x in xs], color="black", linewidth=2, label="roof")
    axes.axvline(ridge, color="grey", linestyle=":", linewidth=1)
    axes.plot([ridge], [peak / scale], "o", color="black", markersize=7)
    axes.annotate(f"ridge {ridge:.1f} FLOP/byte", (ridge, peak / scale), xytext=(8, -16), textcoords="offset points",
                  fontsize=9)
    # Above the roof just right of the ridge: compute-bound layers that reach the peak sit at its far end.
    axes.annotate(f"matmul peak {peak / scale:,.1f} {unit} ({ceiling['matmul_op']})", (ridge, peak / scale),
                  xytext=(8, 5), textcoords="offset points", ha="left", fontsize=9)
    axes.annotate(f"copy bandwidth {bandwidth / 1e9:,.1f} GB/s", (low * 1.5, bandwidth * low * 1.5 / scale),
                  xytext=(10, -4), textcoords="offset points", va="top", fontsize=9)
    backends = list(dict.fromkeys(point["backend"] for point in points))
    for index, backend in enumerate(backends):
        mine = [point for point in points if point["backend"] == backend]
        axes.scatter([p["intensity"] for p in mine], [p["achieved_flop_per_s"] / scale for p in mine],
                     marker=MARKERS[index % len(MARKERS)], color=COLOURS[index % len(COLOURS)], s=40, alpha=0.8,
                     edgecolors="black", linewidths=0.4, label=backend, zorder=3)
    layers = list(dict.fromkeys(point["layer"] for point in points))
    for xy, numbers in layer_labels(points, layers, scale):
        axes.annotate(", ".join(numbers), xy, xytext=(5, -3), textcoords="offset points", fontsize=7, color="#333")
    note = above_roof_note(points)
    if note:
        axes.text(0.01, 0.01, note, transform=axes.transAxes, fontsize=8, style="italic", color="#555")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(low, high)
    highest = max([peak] + [point["achieved_flop_per_s"] for point in points]) / scale
    axes.set_ylim(top=highest * 2)  # room for the ceiling's label
    axes.set_xlabel("Arithmetic intensity (FLOP/byte of compulsory traffic)")
    axes.set_ylabel(f"Achieved {unit}")
    axes.set_title(f"Roofline{': ' + subject if subject else ''} ({ceiling['dtype']}, {ceiling['device']})",
                   fontsize=11)
    axes.grid(True, which="both", alpha=0.25)
    figure.legend(loc="outside right upper")
    if layers:  # the key of the numbers beside the points
        figure.legend(handles=[Line2D([], [], linestyle="none")] * len(layers),
                      labels=[f"{number}  {layer}" for number, layer in enumerate(layers, 1)],
                      loc="outside right lower", title="layers", handlelength=0, handletextpad=0, fontsize=7)
    figure.savefig(path, dpi=120)
    return Path(path)
