"""The lecture's predictions about parameters, compute and memory, as checkable data.

Every ``predicted`` value is a ratio computed by ``analyze`` from real layer shapes: either small
stacks of real ``nn.Conv2d`` layers built on the meta device at real VGG/ResNet widths, or the
real architectures. ``closed_form`` is the ratio worked out in closed form from the lecture's formulas
(or its figures) where they give one.

The purpose-built convolutions have no bias, because the lecture's formulas count weights only
(25C^2, 18C^2, ...); with biases the ratios would be off by a few parts in ten thousand.
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cnnfast.analysis.counter import MEMORY_TYPES, LayerInfo, ModelAnalysis, analyze, analyze_arch


@dataclass
class Claim:
    key: str
    title: str
    statement: str
    quantity: str
    predicted: float
    closed_form: float | None
    closed_form_text: str | None
    details: dict
    # Where the lecture's own figures differ from what is counted here, and why.
    lecture_note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _convs(in_channels: int, size: int, *layers: tuple[int, int]) -> ModelAnalysis:
    """Analyse bias-free 'same' convolutions in sequence; ``layers`` are (out_channels, kernel)."""
    modules = []
    with torch.device("meta"):
        for out_channels, kernel in layers:
            modules.append(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False))
            in_channels = out_channels
    return analyze(nn.Sequential(*modules), size, in_channels=modules[0].in_channels)


def _total(rows: list[LayerInfo], quantity: str) -> int:
    return sum(getattr(row, quantity) for row in rows)


def _memory(rows: list[LayerInfo]) -> int:
    """The lecture's memory: outputs of conv, linear and pooling rows, as the analysis totals it."""
    return _total([row for row in rows if row.type in MEMORY_TYPES], "activation_bytes")


def _rows_through(analysis: ModelAnalysis, last: str) -> list[LayerInfo]:
    """The rows up to and including the one named ``last``."""
    names = [row.name for row in analysis.layers]
    return analysis.layers[: names.index(last) + 1]


def _rows_until_size(analysis: ModelAnalysis, height: int) -> list[LayerInfo]:
    """The rows up to and including the first whose output is ``height`` pixels high."""
    for index, row in enumerate(analysis.layers):
        if len(row.output_shape) == 3 and row.output_shape[1] == height:
            return analysis.layers[: index + 1]
    raise ValueError(f"no layer of {analysis.arch} reaches {height}x{height}")


def _summary(rows: list[LayerInfo]) -> dict:
    return {
        "layers": [row.name for row in rows],
        "params": _total(rows, "params"),
        "macs": _total(rows, "macs"),
        "activation_bytes": _memory(rows),
    }


def _small_kernels_claims() -> list[Claim]:
    channels, size = 256, 56  # VGG-16's conv3 stage
    one_5x5 = _convs(channels, size, (channels, 5))
    two_3x3 = _convs(channels, size, (channels, 3), (channels, 3))
    details = {
        "channels": channels,
        "height": size,
        "width": size,
        "one_5x5": one_5x5.totals,
        "two_3x3": two_3x3.totals,
    }
    statement = (
        "Two stacked 3x3 convolutions (stride 1, pad 1) have the receptive field of one 5x5 "
        "convolution but fewer parameters and less compute: 18C^2 against 25C^2 weights, "
        "18HWC^2 against 25HWC^2 FLOPs."
    )
    return [
        Claim(
            key="vgg_3x3_vs_5x5_params",
            title="VGG: one 5x5 conv vs two 3x3 convs, parameters",
            statement=statement,
            quantity="params",
            predicted=one_5x5.totals["params"] / two_3x3.totals["params"],
            closed_form=25 / 18,
            closed_form_text="25C^2 / 18C^2 = 25/18",
            details=details,
        ),
        Claim(
            key="vgg_3x3_vs_5x5_macs",
            title="VGG: one 5x5 conv vs two 3x3 convs, MACs",
            statement=statement,
            quantity="macs",
            predicted=one_5x5.totals["macs"] / two_3x3.totals["macs"],
            closed_form=25 / 18,
            closed_form_text="25HWC^2 / 18HWC^2 = 25/18",
            details=details,
        ),
    ]


def _pool_then_double_claims() -> list[Claim]:
    channels, size = 128, 56  # VGG-16's conv2_2 (128x112x112) against conv3_2 (256x56x56)
    before_pool = _convs(channels, 2 * size, (channels, 3))
    after_pool = _convs(2 * channels, size, (2 * channels, 3))
    details = {
        "C": channels,
        "H": size,
        "W": size,
        "before_pool_conv_CxC_at_2Hx2W": before_pool.totals,
        "after_pool_conv_2Cx2C_at_HxW": after_pool.totals,
    }
    statement = (
        "After each 2x2 stride-2 max pool VGG doubles the channels. A 3x3 conv 2C->2C on "
        "2C x H x W, against a 3x3 conv C->C on C x 2H x 2W, has half the output memory, "
        "four times the parameters and the same compute."
    )
    return [
        Claim(
            key="vgg_pool_double_memory",
            title="VGG: conv after pool with doubled channels, memory",
            statement=statement,
            quantity="activation_bytes",
            predicted=after_pool.totals["activation_bytes"] / before_pool.totals["activation_bytes"],
            closed_form=1 / 2,
            closed_form_text="2HWC / 4HWC = 1/2",
            details=details,
        ),
        Claim(
            key="vgg_pool_double_params",
            title="VGG: conv after pool with doubled channels, parameters",
            statement=statement,
            quantity="params",
            predicted=after_pool.totals["params"] / before_pool.totals["params"],
            closed_form=4.0,
            closed_form_text="9(2C)^2 / 9C^2 = 36C^2 / 9C^2 = 4",
            details=details,
        ),
        Claim(
            key="vgg_pool_double_macs",
            title="VGG: conv after pool with doubled channels, MACs",
            statement=statement,
            quantity="macs",
            predicted=after_pool.totals["macs"] / before_pool.totals["macs"],
            closed_form=1.0,
            closed_form_text="(H*W*2C)(3*3*2C) / (2H*2W*C)(3*3*C) = 36HWC^2 / 36HWC^2 = 1",
            details=details,
            lecture_note=("the notes print 18HWC^2 for the conv before the pool, which would make the ratio 2, "
                          "against their own conclusion of equal compute; (2H*2W*C)(3*3*C) is 36HWC^2"),
        ),
    ]


def _stem_claims(googlenet: ModelAnalysis, vgg16: ModelAnalysis) -> list[Claim]:
    stem = _summary(_rows_through(googlenet, "maxpool2"))
    vgg = _summary(_rows_until_size(vgg16, 28))
    # The slide's VGG-16 figures are sums through conv3_2 (features.12; its ReLU, features.13, adds
    # nothing), one conv short of 28x28 (its memory figure, the conv outputs alone).
    vgg_to_conv3_2 = _rows_through(vgg16, "features.13")
    details = {
        "googlenet_stem": stem,
        "vgg16_to_28x28": vgg,
        "googlenet_stem_mmac": stem["macs"] / 1e6,
        "vgg16_to_28x28_mmac": vgg["macs"] / 1e6,
        "vgg16_through_conv3_2_mmac": _total(vgg_to_conv3_2, "macs") / 1e6,
        "vgg16_through_conv3_2_params": _total(vgg_to_conv3_2, "params"),
        "vgg16_conv_outputs_through_conv3_2_mib": _total([row for row in vgg_to_conv3_2 if row.type == "conv"],
                                                         "activation_bytes") / 2**20,
        "lecture_slide_mflop": {"googlenet_stem": 418, "vgg16": 7485},
        "lecture_slide_params": {"googlenet_stem": "124K", "vgg16": "1.1M"},
        "lecture_slide_memory_mb": {"googlenet_stem": 7.5, "vgg16": 42.9},
    }
    notes = {
        "macs": (
            f"the slide's totals are 418 MFLOP for GoogLeNet's stem and 7485 for VGG-16 to 28x28; 418 is not the sum "
            f"of the slide's own rows (118 + 2 + 13 + 347 + 1 = 481), which the {details['googlenet_stem_mmac']:.1f} "
            f"M MACs counted here (pooling has none) match, and 7485 stops at conv3_2, one conv short of 28x28 "
            f"({details['vgg16_through_conv3_2_mmac']:.1f} M MACs through conv3_2 here)"
        ),
        "params": (
            f"the slide's figures are 124K parameters for GoogLeNet's stem ({stem['params']:,} here, with its "
            f"BatchNorms') and 1.1M for VGG-16 (8.9x); 1.1M stops at conv3_2, as the slide's MFLOP do "
            f"({details['vgg16_through_conv3_2_params']:,} through conv3_2 here, {vgg['params']:,} to 28x28)"
        ),
        "activation_bytes": (
            f"the slide's figures are 7.5 MB for GoogLeNet's stem ({stem['activation_bytes'] / 2**20:.2f} MiB of "
            f"float32 conv and pooling outputs here) and 42.9 MB for VGG-16 (5.7x), which is its conv outputs "
            f"through conv3_2 alone ({details['vgg16_conv_outputs_through_conv3_2_mib']:.3f} MiB here), without "
            f"conv3_3 and the pooling outputs counted here to 28x28 ({vgg['activation_bytes'] / 2**20:.1f} MiB)"
        ),
    }
    statement = (
        "GoogLeNet's stem aggressively downsamples the input (3x224x224 -> 192x28x28) with far "
        "less compute, fewer parameters and less memory than VGG-16 spends to reach 28x28."
    )
    claims = []
    for quantity, noun in (("macs", "MACs"), ("params", "parameters"), ("activation_bytes", "memory")):
        claims.append(
            Claim(
                key=f"googlenet_stem_vs_vgg16_{quantity}",
                title=f"GoogLeNet stem vs VGG-16 to 28x28, {noun} (VGG-16 / GoogLeNet)",
                statement=statement,
                quantity=quantity,
                predicted=vgg[quantity] / stem[quantity],
                closed_form=None,
                closed_form_text=None,
                details=details,
                lecture_note=notes[quantity],
            )
        )
    return claims


def _head_claims(googlenet: ModelAnalysis, vgg16: ModelAnalysis) -> list[Claim]:
    gap_head = _summary([row for row in googlenet.layers if row.name in ("avgpool", "fc")])
    fc_head = _summary([row for row in vgg16.layers if row.name.startswith("classifier.") and row.type == "linear"])
    details = {"googlenet_gap_head": gap_head, "vgg16_fc_head": fc_head}
    statement = (
        "No large FC layers at the end: global average pooling collapses the spatial dimensions "
        "and one linear layer produces the class scores (VGG-16 has most of its parameters in "
        "its FC layers)."
    )
    return [
        Claim(
            key=f"gap_head_vs_fc_head_{quantity}",
            title=f"Global average pooling + one linear vs VGG-16's FC head, {noun} (VGG-16 / GoogLeNet)",
            statement=statement,
            quantity=quantity,
            predicted=fc_head[quantity] / gap_head[quantity],
            closed_form=None,
            closed_form_text=None,
            details=details,
        )
        for quantity, noun in (("params", "parameters"), ("macs", "MACs"))
    ]


def _alexnet_claims(alexnet: ModelAnalysis) -> list[Claim]:
    conv = alexnet.of_type("conv")
    linear = alexnet.of_type("linear")
    pools = alexnet.of_type("maxpool", "avgpool")
    totals = alexnet.totals
    fc6 = linear[0]
    details = {
        "input_size": alexnet.input_size,
        "conv": _summary(conv),
        "linear": _summary(linear),
        "pool": {**_summary(pools), "pool_ops": _total(pools, "pool_ops")},
        "totals": totals,
        "fc6": {"name": fc6.name, "input_shape": fc6.input_shape, "output_shape": fc6.output_shape, "params": fc6.params},
    }
    return [
        Claim(
            key="alexnet_conv_memory_fraction",
            title="AlexNet: fraction of memory in conv layers",
            statement="Most of the memory is in the convolutional layers.",
            quantity="activation_bytes",
            predicted=_memory(conv) / totals["activation_bytes"],
            closed_form=None,
            closed_form_text=None,
            details=details,
        ),
        Claim(
            key="alexnet_fc_params_fraction",
            title="AlexNet: fraction of parameters in fully connected layers",
            statement=(
                "Most parameters come after flattening: 256x6x6 is flattened to 9216 and mapped "
                "to 4096, which needs a 9216x4096 matrix."
            ),
            quantity="params",
            predicted=_total(linear, "params") / totals["params"],
            closed_form=None,
            closed_form_text=None,
            details=details,
        ),
        Claim(
            key="alexnet_conv_macs_fraction",
            title="AlexNet: fraction of MACs in conv layers",
            statement="The floating-point multiply-adds are concentrated in the convolutional layers.",
            quantity="macs",
            predicted=_total(conv, "macs") / totals["macs"],
            closed_form=None,
            closed_form_text=None,
            details=details,
        ),
        Claim(
            key="alexnet_pool_ops_vs_conv_macs",
            title="AlexNet: pooling operations relative to conv MACs",
            statement="The FLOPs of the pooling layers are small next to the conv layers and can be neglected.",
            quantity="pool_ops",
            predicted=_total(pools, "pool_ops") / _total(conv, "macs"),
            closed_form=None,
            closed_form_text=None,
            details=details,
        ),
    ]


def _bigger_model_claims(alexnet: ModelAnalysis, zfnet: ModelAnalysis, vgg16: ModelAnalysis) -> list[Claim]:
    """VGG-16 and ZFNet against AlexNet (whole models), and where VGG-16's parameters are."""
    statements = {
        "vgg16": "VGG is far deeper than AlexNet, with more parameters and more compute.",
        "zfnet": ("ZFNet changes AlexNet's CONV1 to 7x7 instead of 11x11, and CONV3, 4, 5 to 512, 1024, 512 filters "
                  "instead of 384, 384, 256, which adds channels and the model's complexity."),
    }
    titles = {"vgg16": "VGG-16 vs AlexNet", "zfnet": "ZFNet vs AlexNet"}
    claims = [
        Claim(
            key=f"{name}_vs_alexnet_{quantity}",
            title=f"{titles[name]}, {noun} ({titles[name].split(' vs ')[0]} / AlexNet)",
            statement=statements[name],
            quantity=quantity,
            predicted=model.totals[quantity] / alexnet.totals[quantity],
            closed_form=None,
            closed_form_text=None,
            details={name: model.totals, "alexnet": alexnet.totals,
                     "input_sizes": [model.input_size, alexnet.input_size],
                     "note": "whole models, every change at once, at their default inputs; torchvision's AlexNet "
                             "has 384, 256, 256 filters in CONV3, 4, 5 (the original's are 384, 384, 256)"},
        )
        for name, model in (("vgg16", vgg16), ("zfnet", zfnet))
        for quantity, noun in (("params", "parameters"), ("macs", "MACs"))
    ]
    linear = vgg16.of_type("linear")
    claims.append(Claim(
        key="vgg16_fc_params_fraction",
        title="VGG-16: fraction of parameters in fully connected layers",
        statement="Recall VGG-16: most parameters were in the FC layers.",
        quantity="params",
        predicted=_total(linear, "params") / vgg16.totals["params"],
        closed_form=None,
        closed_form_text=None,
        details={"linear": _summary(linear), "totals": vgg16.totals},
    ))
    return claims


def _resnet_depth_claim(resnet18: ModelAnalysis, resnet34: ModelAnalysis) -> Claim:
    lecture_gflop = {"resnet18": 1.8, "resnet34": 3.6}
    return Claim(
        key="resnet34_vs_resnet18_macs",
        title="ResNet-34 vs ResNet-18, MACs",
        statement=(
            "ResNet-18 (2 blocks a stage) needs 1.8 GFLOP and ResNet-34 (3, 4, 6, 3 blocks) "
            "3.6 GFLOP, where the lecture's FLOP is a multiply-add."
        ),
        quantity="macs",
        predicted=resnet34.totals["macs"] / resnet18.totals["macs"],
        closed_form=lecture_gflop["resnet34"] / lecture_gflop["resnet18"],
        closed_form_text="3.6 / 1.8 = 2 (the lecture's rounded GFLOP figures)",
        details={
            "lecture_gflop": lecture_gflop,
            "resnet18_gmac": resnet18.totals["macs"] / 1e9,
            "resnet34_gmac": resnet34.totals["macs"] / 1e9,
            "input_size": resnet18.input_size,
        },
    )


def _bottleneck_claims() -> list[Claim]:
    """The notes say two things of the bottleneck block: it cuts compute and parameters (against a
    basic block at its own 4C width), and it adds depth without much more compute (against the
    basic block at C, whose 3x3 width it keeps: ResNet-34's stage against ResNet-50's)."""
    width, size = 64, 56  # ResNet-50's first stage: 4C = 256 channels in and out
    bottleneck = _convs(4 * width, size, (width, 1), (width, 3), (4 * width, 1))
    basic = _convs(4 * width, size, (4 * width, 3), (4 * width, 3))
    narrow_basic = _convs(width, size, (width, 3), (width, 3))
    details = {
        "C": width,
        "H": size,
        "W": size,
        "bottleneck_1x1_3x3_1x1": bottleneck.totals,
        "basic_two_3x3": basic.totals,
        "basic_two_3x3_at_C": narrow_basic.totals,
        "note": "convolutions only; BatchNorm adds 2 parameters a channel and no MACs",
    }
    cheaper = (
        "The bottleneck block (1x1 to reduce the channels, 3x3, 1x1 to restore them) cuts compute "
        "and parameters: it is much cheaper than a basic block of two 3x3 convolutions at the same "
        "width, which lets ResNet-50/101/152 go deep without a blow-up in compute."
    )
    deeper = (
        "The bottleneck block adds depth without a significant increase in compute: three "
        "convolutions at 4C channels in and out (256-64-64-256) cost about what the basic block's "
        "two 3x3 convolutions at C = 64 channels do."
    )
    # (key, what is compared, statement, the basic block, its weights in C^2 (its MACs in HWC^2), their formula)
    comparisons = (
        ("bottleneck_vs_basic", "bottleneck vs basic block at 4C = 256 channels", cheaper, basic, 288, "2*9*(4C)^2"),
        ("bottleneck_vs_basic_at_c", "bottleneck at 4C = 256 vs basic block at C = 64", deeper, narrow_basic, 18,
         "2*9*C^2"),
    )
    return [
        Claim(
            key=f"{key}_{quantity}",
            title=f"ResNet: {against}, {noun}",
            statement=statement,
            quantity=quantity,
            predicted=bottleneck.totals[quantity] / other.totals[quantity],
            closed_form=17 / weights,
            closed_form_text=text.format(formula=formula, weights=weights),
            details=details,
        )
        for key, against, statement, other, weights, formula in comparisons
        for quantity, noun, text in (
            ("macs", "MACs", "HW(4C*C + 9C^2 + C*4C) / ({formula} HW) = 17HWC^2 / {weights}HWC^2 = 17/{weights}"),
            ("params", "parameters", "(4C*C + 9C^2 + C*4C) / ({formula}) = 17C^2 / {weights}C^2 = 17/{weights}"),
        )
    ]


def compute_claims() -> list[Claim]:
    """Every claim, computed now from real layer shapes."""
    alexnet = analyze_arch("alexnet")
    vgg16 = analyze_arch("vgg16")
    googlenet = analyze_arch("googlenet")
    return [
        *_small_kernels_claims(),
        *_pool_then_double_claims(),
        *_stem_claims(googlenet, vgg16),
        *_head_claims(googlenet, vgg16),
        *_alexnet_claims(alexnet),
        *_bigger_model_claims(alexnet, analyze_arch("zfnet"), vgg16),
        _resnet_depth_claim(analyze_arch("resnet18"), analyze_arch("resnet34")),
        *_bottleneck_claims(),
    ]
