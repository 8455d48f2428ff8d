"""The lecture's time-relevant claims, measured: both sides of each predicted ratio, timed.

A claim is time-relevant when its quantity is ``macs``, ``flops`` or ``pool_ops``. Each side of its
ratio (the numerator and the denominator of ``Claim.predicted``) is rebuilt here from the claim's
details or from the real architecture, on the torch backend (PyTorch's own layers: cuDNN on a GPU,
oneDNN on a CPU), channels_last, and timed with ``cnnfast.roofline.time_ms``. A side is one or more
parts (a module and its input); its time is the sum of its parts' times:

- ``vgg_3x3_vs_5x5_macs``: one 5x5 conv / two 3x3 convs, 256 channels at 56x56;
- ``vgg_pool_double_macs``: a 3x3 conv 2C->2C at HxW / a 3x3 conv C->C at 2Hx2W (C=128, H=56);
- ``googlenet_stem_vs_vgg16_macs``: VGG-16's features up to 28x28 / GoogLeNet's stem (conv1 .. maxpool2);
- ``gap_head_vs_fc_head_macs``: VGG-16's three linear layers / GoogLeNet's avgpool + flatten + fc;
- ``alexnet_conv_macs_fraction``: AlexNet's conv layers / all its layers, each timed alone (so that
  the fraction is of one sum, at most 1: a whole-model time can be below the sum of its layers');
- ``alexnet_pool_ops_vs_conv_macs``: AlexNet's pooling layers / its conv layers (each timed alone);
- ``resnet34_vs_resnet18_macs``: the whole ResNet-34 / the whole ResNet-18;
- ``vgg16_vs_alexnet_macs``, ``zfnet_vs_alexnet_macs``: the whole VGG-16 or ZFNet / the whole AlexNet;
- ``bottleneck_vs_basic_macs``: 1x1 -> 3x3 -> 1x1 (256-64-64-256) / two 3x3 (256-256-256), 56x56;
- ``bottleneck_vs_basic_at_c_macs``: the same bottleneck / two 3x3 (64-64-64), 56x56.

The measured ratio is time(numerator) / time(denominator), on two backends: ``torch``, the parts as
they are, and ``cnnfast``, each part as ``cnnfast.optimize`` makes it (its default backend for the
device: the tuning table's choice per conv layer on a GPU, PyTorch's ops with the BatchNorm folded
on a CPU). The sides are timed in ROUNDS rounds, in the order A B then B A, so that a machine whose
speed drifts during the measurement moves both sides alike; a side's time is the median of its
round sums (the measured ratio is the ratio of those medians), and ``measured_range`` is the
lowest and highest ratio of one round. A part in both
sides (an AlexNet conv layer in "the conv layers / every layer") is timed once a round and counted
in both, so a fraction of a whole stays at most 1.

Verdict rule (``verdict``), with p the predicted ratio, m the measured one and the pivot 1 for a
ratio of two configurations or 1/2 for a fraction of a whole (the claim says "most"):

- "holds" when m is within a factor of 1.25 of p (1/1.25 <= m/p <= 1.25);
- "holds in direction" otherwise, when m and p lie strictly on the same side of the pivot;
- "does not hold" otherwise (including p exactly at the pivot, "the same compute", with m outside 1.25x).

Explanation of a verdict other than "holds" on the torch side (``explain``). Each side is run once, untimed, with a hook on
every leaf module: flops (2 x MACs of conv and linear leaves, as ``cnnfast.analysis`` counts them),
bytes (``_traffic``: a dense conv's as the roofline counts them, any other leaf's input, output and
parameters, each moved once), calls (leaves run) and the roofline
bound: ``cnnfast.roofline.bound_seconds`` of each leaf under the cached ceilings, summed over the leaves.
A side is "memory"-bound when its memory-bound leaves hold more than half of its bound time. Then:

- "launch overhead" when on either side calls x the empty-op time (one tiny ``torch.relu``, timed
  once) is at least half of the measured time;
- "memory-boundedness" when a side has memory-bound leaves and the roofline ratio (bound time of the
  numerator over the denominator's) closes at least half the gap between the counted and the
  measured ratio (in log scale): with every leaf compute-bound the roofline ratio would be the
  counted one, and a roofline ratio that moves only a little toward the measured one explains
  little of it;
- "neither" otherwise.

JSON (``measure_claims``), schema "cnnfast.claims_measure/2"::

    {"schema", "device", "device_type", "dtype", "batch", "torch_version", "timer",
     "backends": ["torch", "cnnfast"], "skipped": {backend: reason}, "empty_op_ms", "ceilings",
     "verdict_rule", "not_measured": [keys of claims whose quantity is not time],
     "claims": [{"key", "title", "quantity", "predicted", "pivot", "measured", "measured_range", "verdict",
                 "explanation": {"cause", "text", "roofline_ratio"} | null,
                 "cnnfast": {"measured", "measured_range", "verdict", "numerator_ms", "denominator_ms"},
                 "sides": {"numerator" | "denominator": {"label", "ms", "flops", "bytes",
                           "intensity", "bound_ms", "memory_bound_ms", "bound", "calls"}}}]}

CPU timings are CPU timings: they say nothing about GPU speed.
"""
import math
import statistics

import torch
from torch import nn

from cnnfast.analysis import analyze_arch
from cnnfast.analysis.claims import compute_claims
from cnnfast.analysis.counter import ConvProblem, _macs
from cnnfast.bench import default_device, default_dtype
from cnnfast.models import get_model
from cnnfast.roofline import (
    DTYPES, bound_kind, bound_seconds, ceilings, conv_bytes, cudnn_autotuned, device_name, time_ms, timer_description,
)

SCHEMA = "cnnfast.claims_measure/2"
TIME_QUANTITIES = ("macs", "flops", "pool_ops")
TOLERANCE = 1.25
ROUNDS = 2
OVERHEAD_SHARE = 0.5
EXPLAINED_SHARE = 0.5
VERDICT_RULE = (
    f"holds: measured within {TOLERANCE}x of predicted; holds in direction: both strictly on the same side "
    "of the pivot (1 for a ratio, 1/2 for a fraction of a whole); does not hold: otherwise"
)


def verdict(predicted: float, measured: float, pivot: float = 1.0) -> str:
    if 1 / TOLERANCE <= measured / predicted <= TOLERANCE:
        return "holds"
    if (predicted - pivot) * (measured - pivot) > 0:
        return "holds in direction"
    return "does not hold"


# ---------------------------------------------------------------- the two sides of each claim


def _convs(in_channels: int, *layers: tuple[int, int]) -> nn.Sequential:
    """Bias-free 'same' convolutions in sequence, as claims.py counts them; layers are (out_channels, kernel)."""
    modules = []
    for out_channels, kernel in layers:
        modules.append(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False))
        in_channels = out_channels
    return nn.Sequential(*modules)


def _rows(arch: str, names) -> list:
    return [row for row in analyze_arch(arch).layers if row.name in names]


def _segment(model: nn.Module, rows, depth: int):
    """One part: the modules named by rows, cut to their first depth name components, run in order."""
    names = dict.fromkeys(".".join(row.name.split(".")[:depth]) for row in rows)
    return nn.Sequential(*(model.get_submodule(name) for name in names)), tuple(rows[0].input_shape)


def _layer_parts(model: nn.Module, rows) -> list:
    """One part per row: each layer timed alone on its own input."""
    return [(model.get_submodule(row.name), tuple(row.input_shape)) for row in rows]


def _whole(arch: str, model: nn.Module) -> list:
    return [(model, tuple(analyze_arch(arch).layers[0].input_shape))]


def _sides(claim) -> tuple[tuple[str, list], tuple[str, list]]:
    """((numerator label, parts), (denominator label, parts)); a part is (module, input shape without batch)."""
    d = claim.details
    if claim.key == "vgg_3x3_vs_5x5_macs":
        c, h = d["channels"], d["height"]
        return ((f"one 5x5 conv {c}->{c} at {h}x{h}", [(_convs(c, (c, 5)), (c, h, h))]),
                (f"two 3x3 convs {c}->{c} at {h}x{h}", [(_convs(c, (c, 3), (c, 3)), (c, h, h))]))
    if claim.key == "vgg_pool_double_macs":
        c, h = d["C"], d["H"]
        return ((f"3x3 conv {2 * c}->{2 * c} at {h}x{h}", [(_convs(2 * c, (2 * c, 3)), (2 * c, h, h))]),
                (f"3x3 conv {c}->{c} at {2 * h}x{2 * h}", [(_convs(c, (c, 3)), (c, 2 * h, 2 * h))]))
    if claim.key in ("bottleneck_vs_basic_macs", "bottleneck_vs_basic_at_c_macs"):
        c, h = d["C"], d["H"]
        basic_width = 4 * c if claim.key == "bottleneck_vs_basic_macs" else c
        return ((f"bottleneck 1x1/3x3/1x1 {4 * c}-{c}-{c}-{4 * c} at {h}x{h}",
                 [(_convs(4 * c, (c, 1), (c, 3), (4 * c, 1)), (4 * c, h, h))]),
                (f"two 3x3 {basic_width}->{basic_width} at {h}x{h}",
                 [(_convs(basic_width, (basic_width, 3), (basic_width, 3)), (basic_width, h, h))]))
    if claim.key == "googlenet_stem_vs_vgg16_macs":
        vgg = _segment(get_model("vgg16"), _rows("vgg16", d["vgg16_to_28x28"]["layers"]), depth=2)
        stem = _segment(get_model("googlenet"), _rows("googlenet", d["googlenet_stem"]["layers"]), depth=1)
        return ("VGG-16 features to 28x28", [vgg]), ("GoogLeNet stem (conv1 .. maxpool2)", [stem])
    if claim.key == "gap_head_vs_fc_head_macs":
        fc_head = _segment(get_model("vgg16"), _rows("vgg16", d["vgg16_fc_head"]["layers"]), depth=2)
        googlenet = get_model("googlenet")
        gap_rows = _rows("googlenet", d["googlenet_gap_head"]["layers"])
        gap_head = nn.Sequential(googlenet.avgpool, nn.Flatten(), googlenet.fc), tuple(gap_rows[0].input_shape)
        return ("VGG-16 FC head (3 linear layers)", [fc_head]), ("GAP + flatten + one linear", [gap_head])
    if claim.key in ("alexnet_conv_macs_fraction", "alexnet_pool_ops_vs_conv_macs"):
        model = get_model("alexnet")
        conv = ("AlexNet conv layers, each alone", _layer_parts(model, _rows("alexnet", d["conv"]["layers"])))
        if claim.key == "alexnet_conv_macs_fraction":
            return conv, ("AlexNet, every layer alone", _layer_parts(model, analyze_arch("alexnet").layers))
        return ("AlexNet pooling layers, each alone", _layer_parts(model, _rows("alexnet", d["pool"]["layers"]))), conv
    if claim.key == "resnet34_vs_resnet18_macs":
        return (("ResNet-34 whole model", _whole("resnet34", get_model("resnet34"))),
                ("ResNet-18 whole model", _whole("resnet18", get_model("resnet18"))))
    if claim.key in ("vgg16_vs_alexnet_macs", "zfnet_vs_alexnet_macs"):
        name = claim.key.split("_vs_")[0]
        return ((f"{name} whole model", _whole(name, get_model(name))),
                ("AlexNet whole model", _whole("alexnet", get_model("alexnet"))))
    raise ValueError(f"no measurement defined for claim {claim.key!r}")


def pivot(claim) -> float:
    return 0.5 if claim.key.endswith("_fraction") else 1.0


# ---------------------------------------------------------------- timing and counting


def _prepare(module: nn.Module, shape: tuple, batch: int, dtype, device):
    module = module.eval().to(device, dtype)
    x = torch.randn(batch, *shape, device=device, dtype=dtype)
    if x.dim() == 4:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return module, x


def _traffic(leaf: nn.Module, inputs: tuple, output) -> int:
    """A leaf's compulsory bytes: for a dense conv, what cnnfast.roofline.conv_bytes counts (the
    input pixels the filter reads, the weight, the output: a 1x1 stride-2 conv reads a quarter of
    its input), so that a claim's sides and the roofline agree; else its inputs, output and
    parameters, each once."""
    x = inputs[0] if inputs else None
    if (isinstance(leaf, nn.Conv2d) and leaf.groups == 1 and tuple(leaf.dilation) == (1, 1)
            and not isinstance(leaf.padding, str) and isinstance(x, torch.Tensor) and x.dim() == 4):
        return conv_bytes(ConvProblem.of(leaf, x.shape), x.shape[0], x.element_size())
    tensors = [t for t in (*inputs, output, *leaf.parameters(recurse=False)) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _count(module: nn.Module, x: torch.Tensor, ceiling: dict) -> dict:
    """One untimed run, leaf by leaf: flops (2 x MACs), bytes (_traffic), calls,
    and the roofline-bound time summed over the leaves (all of it and the memory-bound leaves' share)."""
    side = {"flops": 0, "bytes": 0, "calls": 0, "bound_ms": 0.0, "memory_bound_ms": 0.0}

    def hook(leaf, inputs, output):
        flops, traffic = 2 * _macs(leaf, output), _traffic(leaf, inputs, output)
        bound_ms = bound_seconds(flops, traffic, ceiling) * 1e3
        side["flops"] += flops
        side["bytes"] += traffic
        side["calls"] += 1
        side["bound_ms"] += bound_ms
        side["memory_bound_ms"] += bound_ms if bound_kind(flops, traffic, ceiling) == "memory" else 0.0

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        module(x)
    finally:
        for handle in handles:
            handle.remove()
    return side


def prepare_side(label: str, parts: list, batch: int, dtype, device, ceiling: dict) -> tuple[dict, list]:
    """(the side's counts, its parts as (module, input) on device, ready to time)."""
    side = {"label": label, "ms": 0.0, "flops": 0, "bytes": 0, "calls": 0, "bound_ms": 0.0, "memory_bound_ms": 0.0}
    prepared = []
    with torch.inference_mode():
        for module, shape in parts:
            module, x = _prepare(module, shape, batch, dtype, device)
            for name, value in _count(module, x, ceiling).items():
                side[name] += value
            prepared.append((module, x))
    side["intensity"] = side["flops"] / side["bytes"]
    side["bound"] = "memory" if side["memory_bound_ms"] > side["bound_ms"] / 2 else "compute"
    return side, prepared


def time_sides(numerator: list, denominator: list, device) -> tuple[float, float, list[float]]:
    """(numerator ms, denominator ms, [min, max] of one round's ratio) of two sides' (module, input)
    parts: each distinct module timed once a round, ROUNDS rounds in the order A B, then B A."""
    def key(module, x):  # a module run on inputs of two shapes is two parts
        return id(module), tuple(x.shape), x.dtype

    distinct = {}
    for module, x in (*numerator, *denominator):
        distinct.setdefault(key(module, x), (module, x))
    order = list(distinct)
    sums = ([], [])
    with torch.inference_mode():
        for round_index in range(ROUNDS):
            times = {part: time_ms(lambda m=distinct[part][0], x=distinct[part][1]: m(x), device)
                     for part in (order if round_index % 2 == 0 else order[::-1])}
            for side, parts in zip(sums, (numerator, denominator)):
                side.append(sum(times[key(module, x)] for module, x in parts))
    ratios = [top / bottom for top, bottom in zip(*sums)]
    return statistics.median(sums[0]), statistics.median(sums[1]), [min(ratios), max(ratios)]


def fused_parts(parts: list, fused: dict) -> list:
    """parts as cnnfast.optimize makes each (wrapped in an nn.Sequential, so that a lone conv or
    linear layer is fused too); fused: id(module) -> its fused form, shared by the two sides."""
    from cnnfast.convert import optimize

    result = []
    for module, x in parts:
        if id(module) not in fused:
            fused[id(module)] = optimize(nn.Sequential(module).eval())
        result.append((fused[id(module)], x))
    return result


def empty_op_ms(device) -> float:
    tiny = torch.zeros(1, device=device)
    return time_ms(lambda: torch.relu(tiny), device, warmup=10, reps=101)


def explain(predicted: float, measured: float, numerator: dict, denominator: dict, empty_ms: float) -> dict:
    """Why a claim does not fully hold: launch overhead, memory-boundedness or neither (see the module docstring)."""
    roofline_ratio = numerator["bound_ms"] / denominator["bound_ms"]
    explanation = _cause(predicted, measured, numerator, denominator, empty_ms, roofline_ratio)
    if any(side["ms"] < side["bound_ms"] for side in (numerator, denominator)):
        explanation["text"] += "; a side beat its roofline bound: the cached ceilings are low, the bounds loose"
    return {**explanation, "roofline_ratio": roofline_ratio}


def _cause(predicted, measured, numerator, denominator, empty_ms, roofline_ratio) -> dict:
    for side in (numerator, denominator):
        overhead = side["calls"] * empty_ms
        if overhead >= OVERHEAD_SHARE * side["ms"]:
            return {"cause": "launch overhead",
                    "text": f"{side['label']}: {side['calls']} calls x {empty_ms:.4f} ms empty-op time = "
                            f"{overhead:.3f} ms of its {side['ms']:.3f} ms"}
    memory_bound = [side for side in (numerator, denominator) if side["memory_bound_ms"] > 0]
    # The roofline explains the gap when it closes at least EXPLAINED_SHARE of it, in log scale.
    explained = abs(math.log(roofline_ratio / measured)) <= (1 - EXPLAINED_SHARE) * abs(math.log(predicted / measured))
    if memory_bound and explained:
        shares = ", ".join(f"{side['label']}: {100 * side['memory_bound_ms'] / side['bound_ms']:.0f}% of its bound "
                           "time in memory-bound layers" for side in memory_bound)
        return {"cause": "memory-boundedness",
                "text": f"{shares}; the roofline ratio {roofline_ratio:.3g} closes at least half the gap from the "
                        f"counted {predicted:.3g} to the measured {measured:.3g}"}
    return {"cause": "neither",
            "text": f"roofline ratio {roofline_ratio:.3g} (counted {predicted:.3g}, measured {measured:.3g}); "
                    f"achieved {100 * numerator['bound_ms'] / numerator['ms']:.0f}% and "
                    f"{100 * denominator['bound_ms'] / denominator['ms']:.0f}% of the roofline bound"}


# ---------------------------------------------------------------- all claims


def measure_claims(batch: int = 1, dtype: str | None = None, device=None, keys=None, claims=None) -> dict:
    """Times both sides of every time-relevant claim (those in keys, when given) on torch and on cnnfast,
    cuDNN choosing its algorithms by timing them (cudnn_autotuned)."""
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    claims = claims if claims is not None else compute_claims()
    timed = [claim for claim in claims if claim.quantity in TIME_QUANTITIES and (keys is None or claim.key in keys)]
    unknown = set(keys or ()) - {claim.key for claim in claims}
    if unknown:
        raise ValueError(f"unknown claims: {', '.join(sorted(unknown))} (the claims: "
                         f"{', '.join(claim.key for claim in claims)})")
    untimed = set(keys or ()) - {claim.key for claim in timed}
    if untimed:
        raise ValueError(f"not time-relevant claims (their quantity is not time): {', '.join(sorted(untimed))}")
    ceiling = ceilings(device, DTYPES[dtype])
    empty_ms = empty_op_ms(device)
    torch.manual_seed(0)
    with cudnn_autotuned():
        rows = [measure_claim(claim, batch, DTYPES[dtype], device, ceiling, empty_ms) for claim in timed]
    return {
        "schema": SCHEMA, "device": device_name(device), "device_type": device.type, "dtype": dtype,
        "batch": batch, "torch_version": torch.__version__, "timer": timer_description(device),
        "backends": ["torch", "cnnfast"], "skipped": {}, "empty_op_ms": empty_ms, "ceilings": ceiling,
        "verdict_rule": VERDICT_RULE,
        "not_measured": [claim.key for claim in claims if claim.quantity not in TIME_QUANTITIES],
        "claims": rows,
    }


def measure_claim(claim, batch: int, dtype, device, ceiling: dict, empty_ms: float) -> dict:
    """One claim's row: both sides timed on torch and on cnnfast, the verdicts and the explanation."""
    (top_label, top_parts), (bottom_label, bottom_parts) = _sides(claim)
    numerator, top = prepare_side(top_label, top_parts, batch, dtype, device, ceiling)
    denominator, bottom = prepare_side(bottom_label, bottom_parts, batch, dtype, device, ceiling)
    numerator["ms"], denominator["ms"], measured_range = time_sides(top, bottom, device)
    measured = numerator["ms"] / denominator["ms"]
    found = verdict(claim.predicted, measured, pivot(claim))
    fused = {}
    fused_top, fused_bottom, fused_range = time_sides(fused_parts(top, fused), fused_parts(bottom, fused), device)
    fused_measured = fused_top / fused_bottom
    return {
        "key": claim.key, "title": claim.title, "quantity": claim.quantity, "predicted": claim.predicted,
        "pivot": pivot(claim), "measured": measured, "measured_range": measured_range, "verdict": found,
        "explanation": None if found == "holds" else explain(claim.predicted, measured, numerator, denominator,
                                                              empty_ms),
        "cnnfast": {"measured": fused_measured, "measured_range": fused_range,
                    "verdict": verdict(claim.predicted, fused_measured, pivot(claim)),
                    "numerator_ms": fused_top, "denominator_ms": fused_bottom},
        "sides": {"numerator": numerator, "denominator": denominator},
    }


def measured_rows(result: dict) -> tuple[tuple, list[tuple]]:
    """(headers, rows): one row per measured claim."""
    headers = ("Claim", "Predicted", "Measured (torch)", "Rounds' range", "Verdict", "Numerator ms", "Denominator ms",
               "Why not", "Measured (cnnfast)", "cnnfast verdict")
    rows = [
        (row["key"], f"{row['predicted']:.4g}", f"{row['measured']:.4g}", range_text(row["measured_range"]),
         row["verdict"], f"{row['sides']['numerator']['ms']:.3f}", f"{row['sides']['denominator']['ms']:.3f}",
         row["explanation"]["cause"] if row["explanation"] else "", f"{row['cnnfast']['measured']:.4g}",
         row["cnnfast"]["verdict"])
        for row in result["claims"]
    ]
    return headers, rows


def range_text(bounds) -> str:
    return f"{bounds[0]:.3g} - {bounds[1]:.3g}"


def measured_on(result: dict) -> str:
    where = f"{result['device']}: CPU timings" if result["device_type"] == "cpu" else result["device"]
    return (f"torch (the layers as they are) and cnnfast (each part through cnnfast.optimize, its default backend "
            f"here), batch {result['batch']}, {result['dtype']}, channels_last, measured on {where} "
            f"({result['timer']}; the sides alternated over {ROUNDS} rounds); empty op {result['empty_op_ms']:.4f} ms")
