"""Per-layer shapes, parameters, MACs and memory of a CNN, measured on the meta device.

Counting follows the lecture:

- ``macs``: multiply-adds for the whole batch. Conv: N*K*P*Q*(C/groups)*R*S; linear: N*in*out;
  every other layer: 0. ``flops`` = 2 * macs.
- ``params``: the weights and biases of the layer itself (BatchNorm: gamma and beta).
- ``activation_bytes``: the layer's output for the whole batch at 4 bytes an element (the
  lecture's "memory"), whatever the model's dtype.
- ``pool_ops``: pooling layers only, output elements x window size for the whole batch, so that
  "pooling costs are negligible" can be shown next to the MACs.

Shapes are per image: [C, H, W], or [features] after flattening.
"""
import math
import operator
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

# The layer kinds the lecture's tables list; "memory" totals sum the outputs of these.
MEMORY_TYPES = ("conv", "linear", "maxpool", "avgpool")

_TYPES = (
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    ((nn.MaxPool2d, nn.AdaptiveMaxPool2d), "maxpool"),
    ((nn.AvgPool2d, nn.AdaptiveAvgPool2d), "avgpool"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batchnorm"),
    (nn.ReLU, "relu"),
)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class LayerInfo:
    """One call of one leaf module."""

    name: str
    type: str
    input_shape: list[int]
    output_shape: list[int]
    kernel_size: list[int] | None
    stride: list[int] | None
    padding: list[int] | None
    params: int
    macs: int
    flops: int
    activation_bytes: int
    pool_ops: int


@dataclass
class ModelAnalysis:
    """All layer calls of one forward pass, and the totals.

    ``totals``: ``params`` counts every parameter of the model once; ``macs`` and ``flops`` sum
    all rows; ``activation_bytes`` sums the outputs of the conv, linear and pooling rows only,
    as the lecture's memory tables do (BatchNorm and ReLU outputs are not counted).
    """

    arch: str
    input_size: int | tuple[int, int]  # an int for a square input, else (height, width)
    batch: int
    layers: list[LayerInfo]
    totals: dict[str, int]

    @property
    def image_text(self) -> str:
        """The input's height x width, "224x224"."""
        height, width = (self.input_size, self.input_size) if isinstance(self.input_size, int) else self.input_size
        return f"{height}x{width}"

    @property
    def pool_ops(self) -> int:
        return sum(layer.pool_ops for layer in self.layers)

    def of_type(self, *types: str) -> list[LayerInfo]:
        """The rows whose type is one of ``types``."""
        return [layer for layer in self.layers if layer.type in types]

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "input_size": self.input_size,
            "batch": self.batch,
            "layers": [asdict(layer) for layer in self.layers],
            "totals": dict(self.totals),
        }


def _layer_type(module: nn.Module) -> str:
    for classes, name in _TYPES:
        if isinstance(module, classes):
            return name
    return "other"


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _window(module: nn.Module, in_hw: list[int], out_hw: list[int]):
    """(kernel_size, stride, padding) as [h, w] lists, or Nones where there is no fixed window."""
    if isinstance(module, _WINDOWED):
        return _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
    if isinstance(module, _ADAPTIVE_POOLS) and all(i % o == 0 for i, o in zip(in_hw, out_hw)):
        step = [i // o for i, o in zip(in_hw, out_hw)]
        return step, step, [0, 0]
    return None, None, None


def _adaptive_window_sum(size_in: int, size_out: int) -> int:
    """Total length of the windows an adaptive pool uses along one dimension."""
    return sum(
        math.ceil((i + 1) * size_in / size_out) - (i * size_in) // size_out for i in range(size_out)
    )


def _pool_ops(module: nn.Module, output: torch.Tensor, in_hw: list[int], out_hw: list[int]) -> int:
    if isinstance(module, _ADAPTIVE_POOLS):
        # Window sizes vary when the sizes do not divide: sum them exactly.
        planes = output.numel() // (out_hw[0] * out_hw[1])
        return planes * _adaptive_window_sum(in_hw[0], out_hw[0]) * _adaptive_window_sum(in_hw[1], out_hw[1])
    kernel_h, kernel_w = _pair(module.kernel_size)
    return output.numel() * kernel_h * kernel_w


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _first_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def _call_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a leaf module was called on: its first tensor argument, positional or keyword."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"layer {name!r} was called without a tensor argument; analyze needs its input's shape")


def _check_against_flop_counter(where: str, rows: list[LayerInfo], counted_in_layers: dict[str, int], macs: int,
                                counted: int) -> None:
    """Warns when torch.utils.flop_counter, which sees every aten op of the pass, counts other MACs
    (``counted``) than the table, which reads the leaf modules it knows (Conv2d, Linear): naming the
    layers it counts otherwise (``counted_in_layers``, its MACs during each layer's calls: a
    ConvTranspose2d, a Conv1d, a custom module, one whose op has no FLOP formula) and the MACs of
    calls outside any layer (a functional conv in a forward)."""
    if counted == macs:
        return
    table: dict[str, int] = {}
    for row in rows:  # a layer called twice is one module
        table[row.name] = table.get(row.name, 0) + row.macs
    differing = [f"{name or 'the model itself'} ({counted_in_layers.get(name, 0):,} against {table[name]:,})"
                 for name in table if counted_in_layers.get(name, 0) != table[name]]
    parts = [f"layers it counts otherwise: {', '.join(differing)}"] if differing else []
    outside = counted - sum(counted_in_layers.values())
    if outside:
        parts.append(f"{outside:,} MACs of calls outside the layers (a functional op in a forward)")
    warnings.warn(f"{where}: the table counts {macs:,} MACs but torch.utils.flop_counter counts {counted:,} for "
                  f"the same pass; {'; '.join(parts)}", stacklevel=3)


def _shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)


def _layer_info(name: str, module: nn.Module, layer_input: torch.Tensor, output: torch.Tensor) -> LayerInfo:
    layer_type = _layer_type(module)
    in_hw, out_hw = list(layer_input.shape[2:]), list(output.shape[2:])
    kernel_size, stride, padding = _window(module, in_hw, out_hw)
    macs = _macs(module, output)
    is_pool = layer_type in ("maxpool", "avgpool")
    return LayerInfo(
        name=name,
        type=layer_type,
        input_shape=list(layer_input.shape[1:]),
        output_shape=list(output.shape[1:]),
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        params=sum(p.numel() for p in module.parameters(recurse=False)),
        macs=macs,
        flops=2 * macs,
        activation_bytes=output.numel() * 4,
        pool_ops=_pool_ops(module, output, in_hw, out_hw) if is_pool else 0,
    )


def _integer_sizes(input_size, batch, in_channels) -> tuple[int, int, int, int]:
    """(height, width, batch, in_channels) as ints, from integers of any kind (Python, NumPy, a 0-d
    integer tensor: operator.index) but not bools; input_size is one or a (height, width) pair."""
    pair = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
    values = (*pair, batch, in_channels)
    try:
        if len(pair) != 2 or any(isinstance(value, bool) or isinstance(value, torch.Tensor)
                                 and (value.dtype == torch.bool or value.dim() != 0) for value in values):
            raise TypeError
        return tuple(operator.index(value) for value in values)
    except TypeError:
        raise TypeError(f"input_size must be an int or an (height, width) pair of ints, batch and in_channels "
                        f"ints; got input_size={input_size!r}, batch={batch!r}, in_channels={in_channels!r}") from None


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 meta stand-ins for every parameter and buffer: no memory, no real computation."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {
        name: torch.empty(t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="meta")
        for name, t in tensors
    }


def analyze(
    model: nn.Module,
    input_size: int | tuple[int, int] = 224,
    batch: int = 1,
    in_channels: int = 3,
    arch: str = "",
) -> ModelAnalysis:
    """Run one inference forward pass on the meta device and record every leaf module call.

    The caller's model is not changed: its parameters and buffers are swapped for meta tensors
    only for the duration of the call, and it runs in eval mode (the inference path) with its
    train/eval flags restored afterwards. A feature map that vanishes (the input is too small
    for the architecture) raises ``ValueError`` naming the layer and the input size. The same pass
    runs under ``torch.utils.flop_counter.FlopCounterMode``; where it counts other MACs than the
    table (a layer kind the table does not count, a functional call), a warning says so.
    """
    height, width, batch, in_channels = _integer_sizes(input_size, batch, in_channels)
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze takes an nn.Module, got {type(model).__name__} (analyze_arch takes a name)")
    if min(height, width, in_channels) < 1 or batch < 0:
        raise ValueError(f"bad input {in_channels}x{height}x{width}, batch {batch}")
    label = arch or type(model).__name__
    where = f"{label} at input {height}x{width}"
    rows: list[LayerInfo] = []
    running: list[tuple[str, nn.Module, torch.Tensor]] = []  # the leaf call in progress, if any
    flop_counter = FlopCounterMode(display=False)
    # The flop counter's MACs during each layer's calls (the outermost, where one leaf calls another).
    counted_in_layers: dict[str, int] = {}
    counted_before: list[int] = []

    def before(module, args, kwargs, name):
        running.append((name, module, _call_input(name, args, kwargs)))
        counted_before.append(flop_counter.get_total_flops())

    def after(module, args, kwargs, output, name):
        _, _, layer_input = running.pop()
        during = (flop_counter.get_total_flops() - counted_before.pop()) // 2
        if not running:
            counted_in_layers[name] = counted_in_layers.get(name, 0) + during
        output = _first_tensor(output)
        if output.dim() == 4 and 0 in output.shape[2:]:
            raise ValueError(
                f"{where} is too small: the feature map vanishes at layer {name!r} "
                f"({type(module).__name__}, output {_shape_text(output.shape[1:])})"
            )
        rows.append(_layer_info(name, module, layer_input, output))

    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    handles = []
    for name, module in leaves:
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, name=name: before(m, a, k, name), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, k, o, name=name: after(m, a, k, o, name), with_kwargs=True))
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        x = torch.empty(batch, in_channels, height, width, device="meta")
    except RuntimeError as error:  # more elements than an int64 counts
        raise ValueError(f"{where}: an input of {batch}x{in_channels}x{height}x{width} is too large to count "
                         f"({str(error).splitlines()[0]})") from None
    try:
        with torch.no_grad(), flop_counter:
            functional_call(model, _meta_state(model), (x,))
    except (RuntimeError, ValueError) as error:  # a fused layer's op raises ValueError
        if not running:  # not inside a layer: this function's own errors among them
            raise
        name, module, layer_input = running[-1]
        # A layer's output with more elements than an int64 counts (a huge batch) is not a small input.
        cause = ("its output is too large to count" if "overflow" in str(error).lower()
                 else "the input is too small or does not fit the model")
        raise ValueError(
            f"{where}: layer {name!r} ({type(module).__name__}) fails on its "
            f"{_shape_text(layer_input.shape[1:])} feature map; {cause} ({error})"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training

    totals = {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": sum(row.macs for row in rows),
        "flops": sum(row.flops for row in rows),
        "activation_bytes": sum(row.activation_bytes for row in rows if row.type in MEMORY_TYPES),
    }
    _check_against_flop_counter(where, rows, counted_in_layers, totals["macs"], flop_counter.get_total_flops() // 2)
    size = height if height == width else (height, width)
    return ModelAnalysis(arch=arch, input_size=size, batch=batch, layers=rows, totals=totals)


@dataclass(frozen=True)
class ConvProblem:
    """The shape of one conv layer's problem, per image: input C x H x W, K filters of R x S."""

    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int]
    padding: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d, input_shape) -> "ConvProblem":
        """The problem conv computes on an input of shape (..., C, H, W)."""
        c, h, w = input_shape[-3:]
        return cls(c, h, w, conv.out_channels, *conv.kernel_size, tuple(conv.stride), tuple(conv.padding))


def conv_problems(analysis: ModelAnalysis) -> dict[ConvProblem, list[str]]:
    """The distinct conv problems of an analysis, in order of first use, with the layers using each."""
    problems: dict[ConvProblem, list[str]] = {}
    for layer in analysis.of_type("conv"):
        c, h, w = layer.input_shape
        key = ConvProblem(c, h, w, layer.output_shape[0], *layer.kernel_size, tuple(layer.stride), tuple(layer.padding))
        problems.setdefault(key, []).append(layer.name)
    return problems


def analyze_arch(name: str, input_size: int | tuple[int, int] | None = None, batch: int = 1) -> ModelAnalysis:
    """Build ``name`` on the meta device and analyse it (default: its lecture input size)."""
    from cnnfast.models import DEFAULT_INPUT_SIZE, get_model

    with torch.device("meta"):
        model = get_model(name)
    return analyze(model, DEFAULT_INPUT_SIZE[name] if input_size is None else input_size, batch=batch, arch=name)


def format_table(analysis: ModelAnalysis) -> str:
    """A lecture-style table of every layer call, per image, with the totals.

    Memory is shown for the conv, linear and pooling rows only, the ones the memory total sums.
    """
    per_image = max(analysis.batch, 1)
    header = f"{'layer':<28} {'type':<9} {'output C x H x W':<18} {'memory KB':>11} {'params k':>11} {'MACs M':>11}"
    lines = [
        f"{analysis.arch or 'model'} at {analysis.image_text}, per image",
        header,
        "-" * len(header),
    ]
    for layer in analysis.layers:
        memory = f"{layer.activation_bytes / per_image / 1024:.1f}" if layer.type in MEMORY_TYPES else "-"
        lines.append(
            f"{layer.name:<28} {layer.type:<9} {_shape_text(layer.output_shape):<18} {memory:>11} "
            f"{layer.params / 1e3:>11.3f} {layer.macs / per_image / 1e6:>11.3f}"
        )
    totals = analysis.totals
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<28} {'':<9} {'':<18} {totals['activation_bytes'] / per_image / 1024:>11.1f} "
        f"{totals['params'] / 1e3:>11.3f} {totals['macs'] / per_image / 1e6:>11.3f}"
    )
    return "\n".join(lines)
