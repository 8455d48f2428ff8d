"""Times every distinct conv layer of an architecture on each backend, and the whole model.

A layer is a convolution as ``cnnfast.optimize`` runs it (``conv_layers``): the conv with its
BatchNorm folded into weight and bias, then its epilogue (``cnnfast.tuning.EPILOGUES``): the ReLU,
and in a ResNet block's last conv the shortcut added before it; a projection shortcut has neither.
Layers of the same geometry and epilogue are timed once. Backends:

- ``torch``:        ``cnnfast.ops.conv2d(backend="torch")``: PyTorch's ops in the layer's dtype
  (cuDNN's conv then in-place bias, residual and ReLU; a float16/bfloat16 1x1 layer as one cuBLAS GEMM);
- ``eager``:        the layer as PyTorch runs a model: ``F.conv2d`` without bias, the BatchNorm
  (eval), then residual and ReLU, each its own kernel; in a model without BatchNorm (AlexNet,
  ZFNet, VGG without BN) the conv with its bias, then the ReLU (as torch_folded);
- ``torch_folded``: ``relu(F.conv2d(x, folded_weight, bias) + residual)``;
- ``compile``:      ``torch.compile`` of torch_folded, compiled afresh for each layer's shapes;
- ``triton``:       ``cnnfast.ops.conv2d(backend="triton")``; needs a CUDA device (the Triton
  interpreter runs on a CPU, but its times say nothing about speed, so it is not timed);
- ``cuda``:         the compiled extension's conv, when ``cnnfast._C`` has one;
- ``torch_triton``: ``cnnfast.ops.conv2d(backend="torch_triton")``: PyTorch's conv, then bias,
  residual and ReLU in one Triton pass; needs a CUDA device (as triton);
- ``cudnn_fused``:  ``cnnfast.ops.conv2d(backend="cudnn_fused")``: cuDNN's runtime-fused
  conv + bias (+ residual) + ReLU; needs a CUDA device, and a layer that ends in a ReLU.

A backend that cannot run here is listed in ``skipped`` with the reason, one that cannot run a
layer's epilogue in that layer's ``skipped``: never dropped silently.
Inputs are channels_last. Times: ``cnnfast.roofline.time_ms`` (GPU: CUDA events, median, L2
flushed; CPU: perf_counter median after warm-up; CPU figures are CPU figures), with
``torch.backends.cudnn.benchmark`` set for the run (``cnnfast.roofline.cudnn_autotuned``).
End to end: the plain model (eager) and ``cnnfast.optimize(model)`` with its default backends
(backend=None: cnnfast.tuning's choice per op and conv layer on a GPU, torch on a CPU), images/s
and latency at the same batch.

JSON (``run_bench``), schema "cnnfast.bench/4"::

    {"schema", "arch", "batch", "input_size", "dtype", "tf32" (float32 convolutions ran as TF32),
     "device", "device_type" ("cpu" | "cuda"), "torch_version", "timer",
     "backends": [timed backend names], "skipped": {backend: reason},
     "layers": [{"layer": first layer name, "layers": [every layer with this problem],
                 "problem": {"C", "H", "W", "K", "R", "S", "stride", "padding", "epilogue"},
                 "flops", "bytes",
                 "results": {backend: {"ms", "flop_per_s", "bytes_per_s", "speedup_vs_torch", "kernel"}},
                 "skipped": {backend: reason}}],
     "end_to_end": [{"variant": "eager" | "cnnfast", "backend" ("torch" | "default"), "ms", "images_per_s",
                     "speedup_vs_eager"}]}

Layer names are the fused model's ("layer1.0.downsample", "inception3a.branch2.1"); "epilogue" is
an EPILOGUES name (results of schema 2 timed every layer with "relu"); "tf32" is new in schema 4
(older float32 results are read as TF32 where they ran on a GPU, cuDNN's default: ran_as_tf32).
``flops`` and ``bytes`` count the whole batch as ``cnnfast.roofline`` does (the residual read
too); ``speedup_vs_torch``
is the torch backend's time over this backend's (null when torch was not timed); ``kernel`` names
what ran on triton (the tuned config, "128x128x64-g8-w8-s3-split1"), cuda (the CUTLASS kernel
and tile, "cutlass-fprop-128x64x64", "cutlass-gemm-pingpong-128x128x64") and torch_triton (its
epilogue's tuned tile, "torch+epilogue-strided-64x64-w4"), null for the PyTorch paths;
``end_to_end`` is empty when the model was not timed.
"""
import copy
import functools
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from cnnfast import ops
from cnnfast.analysis import ConvProblem, analyze_arch
from cnnfast.backends import backends_of, cuda_ops
from cnnfast.convert import optimize
from cnnfast.models import DEFAULT_INPUT_SIZE, get_model
from cnnfast.nn import ConvBNReLU
from cnnfast.roofline import (
    DTYPES, ceilings, conv_bytes, conv_flops, conv_shapes, cudnn_autotuned, device_name, rate_unit, remeasured_ceilings,
    roofline_point, tf32_convolutions, time_ms, timer_description,
)
from cnnfast.tuning import (
    CONV_LAYERS, EPILOGUES, conv2d_layer_key, conv_dtype_key, epilogue_name, fastest_layer_backend,
)

BACKENDS = ("torch", "eager", "torch_folded", "compile", "triton", "cuda", "torch_triton", "cudnn_fused")
BENCH_SCHEMA = "cnnfast.bench/4"
# The backends that are cnnfast.ops.conv2d's own: what `cnnfast tune` times and backend=None chooses from.
TUNED_BACKENDS = backends_of("conv2d")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def skip_reason(backend: str, device) -> str | None:
    """Why backend cannot be timed on device, or None when it can. A kernel whose ReLU turns NaN
    into 0 is not timed either, so that `cnnfast tune` never makes it backend=None's choice."""
    on_gpu = torch.device(device).type == "cuda"
    if backend in ("triton", "torch_triton") and not on_gpu:
        return "needs a CUDA device (the Triton interpreter runs on a CPU but is not a timing backend)"
    if backend == "cudnn_fused" and not on_gpu:
        return "needs a CUDA device (cuDNN's fused convolution)"
    if backend == "cuda":
        if "conv2d" not in cuda_ops():
            return f"cnnfast._C has no conv2d kernel (its ops: {', '.join(cuda_ops()) or 'none, not built'})"
        if not on_gpu:
            return "needs a CUDA device"
    if backend in TUNED_BACKENDS and backend != "torch" and not relu_keeps_nan(backend, torch.device(device)):
        return "its ReLU turns NaN into 0, where torch.relu keeps NaN"
    return None


def layer_skip_reason(backend: str, epilogue: str) -> str | None:
    """Why backend cannot run a layer with this epilogue, or None when it can."""
    if backend == "cudnn_fused" and not EPILOGUES[epilogue][1]:
        return "cuDNN's fused convolution ends in a ReLU; this layer has none"
    return None


@functools.lru_cache(maxsize=None)
def relu_keeps_nan(backend: str, device) -> bool:
    """Whether backend's conv + ReLU leaves NaN wherever a NaN input pixel reaches, as torch.relu
    does (an epilogue's max(x, 0) would give 0 there); checked once per backend and device."""
    x = torch.randn(1, 64, 6, 6, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, :, 2, 3] = float("nan")
    w = torch.randn(64, 64, 3, 3, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = ops.conv2d(x, w, torch.zeros(64, device=device), padding=1, relu=True, backend=backend)
    return bool(y[0, :, 1:4, 2:5].isnan().all())


def conv_layers(arch: str, input_size: int | None = None) -> dict[tuple[ConvProblem, str], list[str]]:
    """The distinct conv layers of arch as cnnfast.optimize runs them, in order of first call:
    {(problem, epilogue name): [the fused model's names of the layers that run it]}. The model is
    built, fused and run on the meta device (shapes only, well under a second); an input too small
    for arch is analyze_arch's ValueError, which names the layer where the feature map vanishes."""
    size = input_size or DEFAULT_INPUT_SIZE[arch]
    analyze_arch(arch, input_size=size)
    with torch.device("meta"):
        fused = optimize(get_model(arch).eval())
    layers: dict[tuple[ConvProblem, str], list[str]] = {}

    def record(module, args, kwargs, name):
        problem = ConvProblem.of(module, args[0].shape)
        residual = args[1] if len(args) > 1 else kwargs.get("residual")  # forward(x, residual=None, out=None)
        epilogue = epilogue_name(residual is not None, module.relu)
        layers.setdefault((problem, epilogue), []).append(name)

    handles = [module.register_forward_pre_hook(functools.partial(record, name=name), with_kwargs=True)
               for name, module in fused.named_modules() if isinstance(module, ConvBNReLU)]
    try:
        with torch.no_grad():
            fused(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return layers


@functools.lru_cache(maxsize=None)
def has_batch_norm(arch: str) -> bool:
    """Whether arch's plain model has BatchNorm layers (torchvision's vgg16 and alexnet have none)."""
    with torch.device("meta"):
        return any(isinstance(module, torch.nn.BatchNorm2d) for module in get_model(arch).modules())


def seeded_feature_map(shape, seed: int, dtype, device) -> torch.Tensor:
    """A standard normal (N, C, H, W) tensor, channels_last, drawn on device itself (a batch-256
    feature map takes seconds to draw on a CPU and copy over) from a generator seeded with seed."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device).to(dtype=dtype, memory_format=torch.channels_last)


def layer_parts(problem, batch, dtype, device):
    """One layer as PyTorch runs it: input (channels_last, dtype, device), the conv weight (float32,
    CPU, scaled by 1/sqrt(fan_in)) and the eval-mode BatchNorm after it, with random statistics and
    affine parameters (float32, CPU); seeded, so every backend sees the same layer."""
    generator = torch.Generator().manual_seed(0)
    x_shape, w_shape = conv_shapes(problem, batch)
    x = seeded_feature_map(x_shape, 0, dtype, device)
    weight = torch.randn(w_shape, generator=generator) / (problem.C * problem.R * problem.S) ** 0.5
    bn = torch.nn.BatchNorm2d(problem.K).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=generator)
        bn.running_var.uniform_(0.5, 2, generator=generator)
        bn.weight.uniform_(0.5, 1.5, generator=generator)
        bn.bias.uniform_(-1, 1, generator=generator)
    return x, weight, bn


def unfolded_layer(weight, bn, dtype, device):
    """layer_parts' weight and BatchNorm as PyTorch runs them: (weight in dtype, channels_last, on
    device; the BatchNorm in dtype on device)."""
    return (weight.to(device=device, dtype=dtype, memory_format=torch.channels_last),
            copy.deepcopy(bn).to(device, dtype))


def fold_layer(weight, bn, dtype, device):
    """layer_parts' weight with its BatchNorm folded in: (weight in dtype, channels_last, float32 bias)."""
    weight, bias = ops.fold_bn(weight, None, bn)
    return weight.to(device=device, dtype=dtype, memory_format=torch.channels_last), bias.to(device)


def layer_residual(problem, batch, epilogue, dtype, device):
    """The shortcut a layer with this epilogue adds (the output's shape, channels_last, seeded), or None."""
    if not EPILOGUES[epilogue][0]:
        return None
    p, q = ops.conv2d_output_size("conv2d", *conv_shapes(problem, batch), problem.stride, problem.padding, (1, 1))
    return seeded_feature_map((batch, problem.K, p, q), 1, dtype, device)


def apply_epilogue(y, residual, relu):
    """y [+ residual] [then ReLU], in PyTorch's ops: a layer's epilogue after its convolution."""
    y = y + residual if residual is not None else y
    return torch.relu(y) if relu else y


def eager_function(problem, x, weight, bn, residual=None, relu=True):
    """The layer as PyTorch runs a model (unfolded_layer's weight and BatchNorm): conv, BatchNorm,
    [+ residual], [ReLU]."""
    return lambda: apply_epilogue(bn(F.conv2d(x, weight, None, problem.stride, problem.padding)), residual, relu)


def layer_function(backend, problem, x, weight, bias, residual=None, relu=True):
    """A no-argument callable that computes the layer on backend (but eager: eager_function)."""
    stride, padding = problem.stride, problem.padding
    if backend in TUNED_BACKENDS:
        return lambda: ops.conv2d(x, weight, bias, stride=stride, padding=padding, residual=residual, relu=relu,
                                  backend=backend)
    bias_in_dtype = bias.to(x.dtype)

    def folded():
        return apply_epilogue(F.conv2d(x, weight, bias_in_dtype, stride, padding), residual, relu)

    if backend == "torch_folded":
        return folded
    torch._dynamo.reset()  # a fresh compile for this layer's shapes, never a recompile-limit fallback to eager
    return torch.compile(folded)


def kernel_name(backend, problem, x, weight, bias, residual=None, relu=True) -> str | None:
    """What layer_function(backend, ...) runs, once it has run: the tuned Triton config, the CUTLASS
    kernel and its CTA tile, or torch_triton's epilogue tile; None for the PyTorch paths (or a
    Triton layer not yet run)."""
    if backend == "triton":
        from cnnfast.triton_kernels.conv2d import tuned_kernel_name

        return tuned_kernel_name(x, weight, bias, residual, x.dtype, problem.stride, problem.padding, (1, 1))
    if backend == "cuda":
        return ops.cuda_conv2d_kernel(x.dtype, problem.K, (problem.R, problem.S), problem.stride, problem.padding, relu)
    if backend == "torch_triton":  # PyTorch's convolution, then the epilogue over its channels_last result
        from cnnfast.triton_kernels.add_relu import tuned_config_name

        conv_result = ops._empty_conv2d_output(x.to("meta"), weight.to("meta"), problem.stride, problem.padding, (1, 1))
        meta_residual = residual.to("meta") if residual is not None else None
        name = tuned_config_name(conv_result, meta_residual, conv_result, relu, bias.to("meta"))
        return f"torch+epilogue-{name}" if name is not None else None
    return None


def clock(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss past an hour)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(done: int, total: int, label: str, elapsed_s: float, bar_width: int = 0) -> str:
    """Where a run stands as it starts step done + 1 of total: its label, the time so far and, once
    a step has finished, the time left at the mean pace so far; led by a bar of bar_width cells
    (the share done) when bar_width > 0, else by "[step/total]"."""
    pace = f"{clock(elapsed_s)} elapsed" + (f", ~{clock(elapsed_s / done * (total - done))} left" if done else "")
    if bar_width <= 0:
        return f"[{done + 1}/{total}] {label} ({pace})"
    filled = bar_width * done // total
    return f"[{'#' * filled}{'.' * (bar_width - filled)}] {done + 1}/{total} {label}  {pace}"


def terminal_columns(stream) -> int:
    """The width of the terminal that stream writes to (stderr's, when stdout is redirected); a
    terminal that reports no width (0, as under `script`) gets $COLUMNS or 80."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # not a terminal file, or no file at all
        columns = 0
    return columns or shutil.get_terminal_size().columns or 80


class Progress:
    """The progress of a long run on stderr: a bar redrawn in place on a terminal, one line per
    step elsewhere (a log, CI); nothing when show is false."""

    def __init__(self, total: int, show: bool, stream=None):
        self.total, self.show, self.stream = total, show, stream or sys.stderr
        self.in_place = show and self.stream.isatty()
        self.done, self.start = 0, time.monotonic()

    def step(self, label: str) -> None:
        """Announces the next step."""
        if self.show:
            elapsed = time.monotonic() - self.start
            if self.in_place:
                columns = terminal_columns(self.stream)
                # One terminal row, so that the carriage return redraws it instead of a wrapped tail.
                text = progress_text(self.done, self.total, label, elapsed, bar_width=20)[: columns - 1]
                self.stream.write("\r" + text.ljust(columns - 1))
            else:
                self.stream.write(progress_text(self.done, self.total, label, elapsed) + "\n")
            self.stream.flush()
        self.done += 1

    def close(self) -> None:
        """Ends the bar's row (on a terminal), so that what is printed next starts a line of its own."""
        if self.in_place and self.done:
            self.stream.write("\n")
            self.stream.flush()


def bench_layers(layers, batch, dtype, device, backends, progress=None, batch_norm=True) -> list[dict]:
    """The "layers" rows: every ((problem, epilogue), names) of layers (conv_layers') timed on each
    backend that can run its epilogue; each layer is a step of progress (a Progress), when given.
    batch_norm=False (a model without BatchNorm): eager runs the conv with its bias, as the model does."""
    rows = []
    failed = {}  # backend -> why it failed on an earlier layer
    for (problem, epilogue), names in layers.items():
        if progress is not None:
            progress.step(f"{names[0]}: {', '.join(backends)}")
        x, raw_weight, bn = layer_parts(problem, batch, dtype, device)
        weight, bias = fold_layer(raw_weight, bn, dtype, device)
        residual = layer_residual(problem, batch, epilogue, dtype, device)
        relu = EPILOGUES[epilogue][1]
        flops = conv_flops(problem, batch)
        traffic = conv_bytes(problem, batch, dtype.itemsize, residual=residual is not None)
        skipped = {backend: reason for backend in backends if (reason := layer_skip_reason(backend, epilogue))}
        skipped.update((backend, reason) for backend, reason in failed.items() if backend in backends)
        times = {}
        for backend in backends:
            if backend in skipped:
                continue
            if backend == "eager" and batch_norm:
                fn = eager_function(problem, x, *unfolded_layer(raw_weight, bn, dtype, device), residual, relu)
            else:
                fn = layer_function("torch_folded" if backend == "eager" else backend, problem, x, weight, bias,
                                    residual, relu)
            with torch.inference_mode():
                try:
                    fn()  # compiles (compile), autotunes (triton) or warms caches before timing
                except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor's InductorError too
                    if backend != "compile":
                        raise
                    # torch.compile needs the machine's toolchain (a C++ compiler on a CPU): where its
                    # backend cannot build, it is listed as skipped with PyTorch's reason, here and after.
                    failed[backend] = skipped[backend] = f"torch.compile failed here: {first_line(error)}"
                    continue
                times[backend] = time_ms(fn, device)
        results = {
            backend: {
                "ms": ms,
                "flop_per_s": flops / (ms * 1e-3),
                "bytes_per_s": traffic / (ms * 1e-3),
                "speedup_vs_torch": times["torch"] / ms if "torch" in times else None,
                "kernel": kernel_name(backend, problem, x, weight, bias, residual, relu),
            }
            for backend, ms in times.items()
        }
        shape = {"C": problem.C, "H": problem.H, "W": problem.W, "K": problem.K, "R": problem.R, "S": problem.S,
                 "stride": list(problem.stride), "padding": list(problem.padding), "epilogue": epilogue}
        rows.append({"layer": names[0], "layers": names, "problem": shape, "flops": flops, "bytes": traffic,
                     "results": results, "skipped": skipped})
    return rows


def first_line(error: Exception) -> str:
    """'Type: first line of the message' of the error a compiler wrapper (BackendCompilerFailed) holds."""
    error = getattr(error, "inner_exception", None) or error
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def bench_model(arch, batch, dtype, device, input_size) -> list[dict]:
    """The "end_to_end" rows: the plain model in eager mode and cnnfast.optimize(model)."""
    torch.manual_seed(0)
    plain = get_model(arch).eval()
    fused = optimize(copy.deepcopy(plain), dtype=dtype, inplace=True).to(device)
    plain = plain.to(device, dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, input_size, input_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    rows = []
    for variant, model, model_backend in (("eager", plain, "torch"), ("cnnfast", fused, "default")):
        with torch.inference_mode():
            ms = time_ms(lambda: model(x), device)
        rows.append({"variant": variant, "backend": model_backend, "ms": ms, "images_per_s": batch / (ms * 1e-3)})
    for row in rows:
        row["speedup_vs_eager"] = rows[0]["ms"] / row["ms"]
    return rows


def device_memory_bytes(device: torch.device) -> int:
    """The memory of device: a GPU's own, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_feature_maps_fit(layers, batch: int, dtype, device) -> None:
    """A ValueError naming the layer whose input, output and residual alone are more than the
    device's memory: said before anything is drawn, where allocating them would fail after
    minutes (or on a CPU, page the machine to a halt)."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    total = device_memory_bytes(device)
    for (problem, _), names in layers.items():
        x_shape, w_shape = conv_shapes(problem, batch)
        p, q = ops.conv2d_output_size("conv2d", x_shape, w_shape, problem.stride, problem.padding, (1, 1))
        needed = (math.prod(x_shape) + 2 * batch * problem.K * p * q) * element_size
        if needed > total:
            raise ValueError(
                f"at batch {batch}, layer {names[0]}'s input, output and residual alone take {needed / 2**30:,.1f} GiB, "
                f"more than the {total / 2**30:,.1f} GiB of {device_name(device)}: use a smaller --batch or --input-size"
            )


def run_bench(arch, batch=1, dtype=None, device=None, backends=None, input_size=None, max_layers=None,
              end_to_end=True, show_progress=False) -> dict:
    """Times the distinct conv layers of arch (the first max_layers of them) and the whole model."""
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    input_size = input_size or DEFAULT_INPUT_SIZE[arch]
    backends = backends or BACKENDS
    unknown = [backend for backend in backends if backend not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; expected some of {', '.join(BACKENDS)}")
    skipped = {backend: reason for backend in backends if (reason := skip_reason(backend, device))}
    # What the op itself refuses under this run's settings (IEEE float32 on CUTLASS, cuDNN's fused
    # conv under deterministic algorithms): its refusal reads the dtype alone.
    probe = torch.empty(0, dtype=DTYPES[dtype])
    skipped.update((backend, str(refusal)) for backend in backends
                   if backend not in skipped and backend in TUNED_BACKENDS
                   and (refusal := ops.conv2d_backend_refusal(probe, 1, True, backend)) is not None)
    timed = [backend for backend in backends if backend not in skipped]
    if not timed:
        raise ValueError("none of the backends asked for can run here: "
                         + "; ".join(f"{backend}: {reason}" for backend, reason in skipped.items()))
    layers = dict(list(conv_layers(arch, input_size).items())[:max_layers])
    check_feature_maps_fit(layers, batch, DTYPES[dtype], device)
    progress = Progress(len(layers) + end_to_end, show_progress)
    try:
        with cudnn_autotuned():
            rows = bench_layers(layers, batch, DTYPES[dtype], device, timed, progress, has_batch_norm(arch))
            end_to_end_rows = []
            if end_to_end:
                progress.step(f"end to end: {arch} eager and cnnfast.optimize")
                end_to_end_rows = bench_model(arch, batch, DTYPES[dtype], device, input_size)
    finally:  # an error's traceback, too, starts on a line of its own
        progress.close()
    return {
        "schema": BENCH_SCHEMA,
        "arch": arch,
        "batch": batch,
        "input_size": input_size,
        "dtype": dtype,
        "tf32": tf32_convolutions(device, DTYPES[dtype]),
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "timer": timer_description(device),
        "backends": timed,
        "skipped": skipped,
        "layers": rows,
        "end_to_end": end_to_end_rows,
    }


# ---------------------------------------------------------------- tables


def skipped_lines(result) -> list[str]:
    """What a bench result did not time, and why: the backends that cannot run on this machine,
    then those that cannot run some layers' epilogue, with those layers."""
    lines = [f"skipped {backend}: {reason}" for backend, reason in result["skipped"].items()]
    by_reason = {}
    for layer in result["layers"]:
        for backend, reason in layer["skipped"].items():
            by_reason.setdefault((backend, reason), []).append(layer["layer"])
    lines += [f"skipped {backend} on {', '.join(layers)}: {reason}" for (backend, reason), layers in by_reason.items()]
    return lines


def layer_rows(result) -> tuple[tuple, list[tuple]]:
    """(headers, rows): one row per layer and backend."""
    unit, scale = rate_unit(result["device_type"])
    headers = ("layer", "problem", "backend", "ms", unit, "GB/s", "speedup vs torch")
    rows = []
    for layer in result["layers"]:
        shape = layer["problem"]
        problem = (f"{shape['C']}x{shape['H']}x{shape['W']}->{shape['K']} "
                   f"{shape['R']}x{shape['S']} s{shape['stride'][0]} {shape['epilogue']}")
        for backend, figures in layer["results"].items():
            speedup = figures["speedup_vs_torch"]
            rows.append((layer["layer"], problem, backend, f"{figures['ms']:.3f}",
                         f"{figures['flop_per_s'] / scale:,.1f}", f"{figures['bytes_per_s'] / 1e9:,.1f}",
                         "-" if speedup is None else f"{speedup:.2f}"))
    return headers, rows


def summary_rows(result) -> tuple[tuple, list[tuple]]:
    """(headers, rows): per backend, every conv call of the model summed (each distinct layer times
    its uses); a backend that could not run some layers' epilogue sums the others and says how many.
    Its speedup is the torch backend's time over its own, on those calls summed alike."""
    unit, scale = rate_unit(result["device_type"])
    headers = ("backend", "conv ms (all calls)", unit, "speedup vs torch (all calls)")
    rows = []
    for backend in result["backends"]:
        layers = [layer for layer in result["layers"] if backend in layer["results"]]

        def all_calls(figure):
            return sum(figure(layer) * len(layer["layers"]) for layer in layers)

        total_ms = all_calls(lambda layer: layer["results"][backend]["ms"])
        total_flops = all_calls(lambda layer: layer["flops"])
        timed_on_torch = layers and all("torch" in layer["results"] for layer in layers)
        speedup = all_calls(lambda layer: layer["results"]["torch"]["ms"]) / total_ms if timed_on_torch else None
        share = "" if len(layers) == len(result["layers"]) else f" ({len(layers)} of {len(result['layers'])} layers)"
        rate = f"{total_flops / (total_ms * 1e-3) / scale:,.1f}" if layers else "-"
        conv_ms = f"{total_ms:.3f}" if layers else "-"
        rows.append((backend, f"{conv_ms}{share}", rate, "-" if speedup is None else f"{speedup:.2f}"))
    return headers, rows


def end_to_end_rows(result) -> tuple[tuple, list[tuple]]:
    headers = ("model", "backend", "latency ms", "images/s", "speedup vs eager")
    rows = [(row["variant"], row["backend"], f"{row['ms']:.3f}", f"{row['images_per_s']:,.1f}",
             f"{row['speedup_vs_eager']:.2f}") for row in result["end_to_end"]]
    return headers, rows


def table_layer_key(problem: dict) -> str:
    """The tuning table's key of a layer problem as the results record it ({"C", "H", "W", "K", "R",
    "S", "stride", "padding", "epilogue"} and, from the conv benchmark, "dilation"; 1 when absent)."""
    p = problem
    # Results of bench schema 2 (tune*.json filed with a run) timed every layer with a ReLU.
    return conv2d_layer_key(p["C"], p["H"], p["W"], p["K"], p["R"], p["S"], p["stride"], p["padding"],
                            p.get("dilation", (1, 1)), p.get("epilogue", "relu"))


def layer_times(layer) -> tuple[str, dict]:
    """(the tuning table's key, {backend: ms} of the tuned backends) of one "layers" row."""
    times = {backend: figures["ms"] for backend, figures in layer["results"].items() if backend in TUNED_BACKENDS}
    return table_layer_key(layer["problem"]), times


def layer_choice(layer) -> tuple[str, str | None]:
    """(the tuning table's key, the backend the layer rule picks) for one "layers" row of a bench
    result; the backend is None when torch was not timed."""
    key, times = layer_times(layer)
    return key, fastest_layer_backend(times)


def ran_as_tf32(record) -> bool:
    """Whether a bench result (or a conv benchmark's extra_info) timed float32 convolutions as
    TF32: its "tf32"; for one older than schema 4, whether it ran on a GPU, where cuDNN's setting
    was then TF32 by default."""
    if "tf32" in record:
        return record["tf32"]
    return record["device_type"] == "cuda" if "device_type" in record else record.get("device") != "cpu"


def conv_precision_key(record) -> str:
    """The tuning table's precision key (conv_dtype_key) of what a bench result (or a conv
    benchmark's extra_info) timed: its dtype, float32 as TF32 where ran_as_tf32."""
    return conv_dtype_key(DTYPES[record["dtype"]], ran_as_tf32(record))


def layer_choices(result) -> dict:
    """The tuning-table fragment of a bench result (``cnnfast.tuning``'s layout): per distinct conv
    layer timed on torch, the layer rule's backend at the result's batch."""
    dtype = conv_precision_key(result)
    layers = {key: {str(result["batch"]): chosen}
              for key, chosen in map(layer_choice, result["layers"]) if chosen is not None}
    return {result["device"]: {CONV_LAYERS: {dtype: layers}}}


def roofline_points_under_ceilings(result) -> tuple[list[dict], dict]:
    """(roofline_points, the ceilings) of a bench result under the device's cached ceilings,
    measured again once (remeasured_ceilings keeps the higher figures) where a point beats its bound."""
    device, dtype = result["device_type"], DTYPES[result["dtype"]]
    ceiling = ceilings(device, dtype)
    points = roofline_points(result, ceiling)
    if any(point["percent_of_bound"] > 100 for point in points):
        ceiling = remeasured_ceilings(device, dtype)
        points = roofline_points(result, ceiling)
    return points, ceiling


def roofline_points(result, ceiling) -> list[dict]:
    """Each timed layer and backend of a bench result, placed under the roof of ceiling."""
    return [
        roofline_point(layer["layer"], backend, layer["flops"], layer["bytes"], figures["ms"], ceiling,
                       figures.get("kernel"))
        for layer in result["layers"]
        for backend, figures in layer["results"].items()
    ]
