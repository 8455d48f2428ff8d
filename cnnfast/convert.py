"""cnnfast.optimize(model): swaps the blocks of a model for fused ones.

Recognised: torchvision's AlexNet and VGG (Conv2d -> [BatchNorm2d] -> ReLU runs and the
Linear -> ReLU classifier inside nn.Sequential), GoogLeNet (BasicConv2d, Inception, the GAP +
linear head), ResNet (the stem, BasicBlock, Bottleneck, the head), cnnfast's ZFNet and
pre-activation ResNets, and any Conv2d -> BatchNorm2d -> ReLU run inside an nn.Sequential.
Everything else stays as it was and keeps working; the report says what was fused and why the
rest was left alone.
"""
import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d as TvBasicConv2d
from torchvision.models.googlenet import GoogLeNet as TvGoogLeNet
from torchvision.models.googlenet import Inception as TvInception
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet

from cnnfast.backends import BACKEND_OPS, check_backend_name
from cnnfast.models import preact
from cnnfast.nn import (
    BasicBlock, BatchNormReLU, Bottleneck, ConvBNReLU, GlobalAvgPoolLinear, Inception, LinearReLU, PreActBasicBlock,
)
from cnnfast.nn.conv import unsupported_reason

FUSED_LEAVES = (ConvBNReLU, LinearReLU, GlobalAvgPoolLinear, BatchNormReLU)
# Layers that have no fused form, with the reason the report gives.
LEFT_ALONE = {
    nn.MaxPool2d: "max pooling runs in PyTorch (channels_last)",
    nn.AdaptiveAvgPool2d: "adaptive average pooling runs in PyTorch (it is not followed by a single linear layer)",
    nn.Dropout: "dropout is the identity in eval mode",
    nn.Flatten: "flatten is a view or a copy, not a kernel",
}


@dataclass
class FusionReport:
    fused: list[tuple[str, str]] = field(default_factory=list)  # (name, what it became)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} modules:"]
        lines += [f"  {name}: {what}" for name, what in self.fused]
        lines.append(f"left alone {len(self.left_alone)} modules:")
        lines += [f"  {name}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


class ModelInput:
    """Forward pre-hook: converts a 4-D input to the model's dtype and channels_last, once, at the boundary."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
            return None
        # Integer inputs are not cast: the first fused op rejects them with a TypeError.
        x = args[0].to(self.dtype) if self.dtype is not None and args[0].is_floating_point() else args[0]
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])


def optimize(model: nn.Module, *, dtype=None, backend=None, inplace=False, verbose=False) -> nn.Module:
    """Returns `model` with its blocks fused (a copy unless inplace=True).

    The model must be in eval mode with running BatchNorm statistics (BN is folded, once, in
    float32). dtype: the compute dtype of the result (default: the model's own); backend: the
    cnnfast backend of every fused op, "triton", "cuda" or "torch" (None: the default of the input's
    device, per op and conv layer, "torch_triton" and "cudnn_fused" among its choices for a conv).
    What was fused and what was left alone is in `model.cnnfast_report` (printed with verbose=True).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"optimize: the model is in training mode ({', '.join(training[:3])}...); fused modules are for "
            "inference: call model.eval() first"
        )
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise RuntimeError(f"optimize: BatchNorm {name!r} has no running statistics (track_running_stats=False)")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"optimize: dtype must be float32, float16 or bfloat16, got {dtype}")
    check_backend_name("optimize", backend)
    if backend in BACKEND_OPS:
        raise ValueError(
            f"optimize: backend {backend!r} runs only {', '.join(BACKEND_OPS[backend])}, not every "
            "fused op of a model; backend=None uses it for each conv layer where it was measured fastest"
        )
    if not inplace:
        model = copy.deepcopy(model)
    report = FusionReport()
    with torch.no_grad():
        _fuse_tree(model, "", dict(dtype=dtype, backend=backend), report)
        _cast_unfused(model, dtype)
    model.eval()  # the fused modules are built in training mode, like every new nn.Module
    model.register_forward_pre_hook(ModelInput(dtype))
    model.cnnfast_report = report
    if verbose:
        print(report)
    return model


def _fuse_tree(module: nn.Module, prefix: str, options: dict, report: FusionReport) -> None:
    _fuse_model_level(module, prefix, options, report)
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, prefix, options, report)
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        try:
            fused = _fuse_block(child, full, options)
        except NotImplementedError as error:  # e.g. a ResNeXt Bottleneck's grouped conv
            report.left_alone.append((full, str(error)))
            continue
        if fused is not None:
            setattr(module, name, fused)
            report.fused.append((full, f"{type(child).__name__} -> fused {type(fused).__name__}"))
        elif isinstance(child, FUSED_LEAVES) or isinstance(child, nn.Identity):
            continue
        elif next(child.children(), None) is not None:
            _fuse_tree(child, f"{full}.", options, report)
        else:
            report.left_alone.append((full, _reason_left_alone(child)))


def _fuse_block(child: nn.Module, name: str, options: dict):
    if isinstance(child, TvBasicBlock):
        return BasicBlock.from_torchvision(child, name=name, **options)
    if isinstance(child, TvBottleneck):
        return Bottleneck.from_torchvision(child, name=name, **options)
    if isinstance(child, TvInception):
        return Inception.from_torchvision(child, name=name, **options)
    if isinstance(child, TvBasicConv2d):
        return ConvBNReLU.from_modules(child.conv, child.bn, True, name=name, **options)
    if isinstance(child, preact.PreActBasicBlock):
        return PreActBasicBlock.from_module(child, name=name, **options)
    return None


def _fuse_model_level(module: nn.Module, prefix: str, options: dict, report: FusionReport) -> None:
    """The parts of a model that live as separate attributes rather than in one block: stems and heads."""
    # The isinstance(..., nn.BatchNorm2d) tests make a second optimize() of a fused model a no-op, and
    # leave a stem whose bn1 was replaced (by a GroupNorm, say) as it is.
    stem = isinstance(module, (TvResNet, preact.PreActResNet)) and isinstance(module.bn1, nn.BatchNorm2d)
    if stem:
        module.conv1 = ConvBNReLU.from_modules(module.conv1, module.bn1, True, name=f"{prefix}conv1", **options)
        module.bn1 = nn.Identity()
        report.fused.append((f"{prefix}conv1", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"))
    final = isinstance(module, preact.PreActResNet) and isinstance(module.bn_final, nn.BatchNorm2d)
    if final:
        module.bn_final = BatchNormReLU(module.bn_final, dtype=options["dtype"], name=f"{prefix}bn_final")
        report.fused.append((f"{prefix}bn_final", "BatchNorm2d + ReLU -> BatchNormReLU"))
    if stem and (final or isinstance(module, TvResNet)):
        module.relu = nn.Identity()  # all its uses (the stem's, and the pre-activated head's) are fused above
    if isinstance(module, (TvResNet, TvGoogLeNet, preact.PreActResNet)) and _is_global_pool_linear(module):
        # forward() runs avgpool -> flatten -> [dropout] -> fc: pooling and fc become one op.
        module.avgpool = GlobalAvgPoolLinear.from_modules(module.fc, **options)
        module.fc = nn.Identity()
        report.fused.append((f"{prefix}avgpool", "AdaptiveAvgPool2d + Linear -> GlobalAvgPoolLinear"))


def _is_global_pool_linear(model: nn.Module) -> bool:
    """Whether the head is a global average pool and one nn.Linear (not a replaced fc or a pool to 2x2)."""
    pool = model.avgpool
    return isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)) and type(model.fc) is nn.Linear


def _fuse_sequential(seq: nn.Sequential, prefix: str, options: dict, report: FusionReport) -> None:
    """Conv2d -> [BatchNorm2d] -> [ReLU] and Linear -> [ReLU] runs; the absorbed layers become nn.Identity,
    so the indices (and the names of the layers that stay) do not move."""
    layers = list(seq)
    for i, layer in enumerate(layers):
        if type(layer) not in (nn.Conv2d, nn.Linear) or (type(layer) is nn.Conv2d and unsupported_reason(layer)):
            continue
        run = [i]
        j = i + 1
        bn = relu = None
        if isinstance(layer, nn.Conv2d) and j < len(layers) and isinstance(layers[j], nn.BatchNorm2d):
            bn = layers[j]
            run.append(j)
            j += 1
        if j < len(layers) and isinstance(layers[j], nn.ReLU):
            relu = layers[j]
            run.append(j)
        if isinstance(layer, nn.Conv2d):
            fused = ConvBNReLU.from_modules(layer, bn, relu, name=f"{prefix}{i}", **options)
        else:
            fused = LinearReLU.from_modules(layer, relu, **options)
        seq[i] = fused
        for k in run[1:]:
            seq[k] = nn.Identity()
        parts = " + ".join(type(layers[k]).__name__ for k in run)
        report.fused.append((f"{prefix}{i}", f"{parts} -> {type(fused).__name__}"))


def _reason_left_alone(layer: nn.Module) -> str:
    if type(layer) is nn.Conv2d:
        return unsupported_reason(layer) or "a Conv2d outside an nn.Sequential run or a known block is not fused"
    for kind, reason in LEFT_ALONE.items():
        if isinstance(layer, kind):
            return reason
    return f"{type(layer).__name__} has no fused form; it runs as it is"


def _cast_unfused(model: nn.Module, dtype) -> None:
    """Casts the parameters and buffers of the modules that were not fused (fused ones chose their
    dtypes when they were built: weights in `dtype`, biases in float32), and makes 4-D weights channels_last."""
    for module in model.modules():
        if isinstance(module, FUSED_LEAVES):
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not tensor.is_floating_point():
                continue
            converted = tensor.to(dtype) if dtype is not None else tensor
            if converted.dim() == 4:
                converted = converted.contiguous(memory_format=torch.channels_last)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(converted, requires_grad=tensor.requires_grad))
            else:
                setattr(module, name, converted)
