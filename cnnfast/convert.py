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

from cnnfast import ops
from cnnfast.backends import BACKEND_OPS, check_backend_name
from cnnfast.models import preact
from cnnfast.nn import (
    BasicBlock, BatchNormReLU, Bottleneck, ConvBNReLU, GlobalAvgPoolLinear, Inception, LinearReLU, PreActBasicBlock,
)
from cnnfast.nn.absorbed import Absorbed, installed_forward
from cnnfast.nn.conv import check_no_hooks, computes_as, is_foldable_norm, unsupported_reason

FUSED_LEAVES = (ConvBNReLU, LinearReLU, GlobalAvgPoolLinear, BatchNormReLU)
BACKEND_LEAVES = (ConvBNReLU, LinearReLU, GlobalAvgPoolLinear)  # those that run a cnnfast op (BatchNormReLU: PyTorch's)
# The fused modules that take (N, C, H, W) feature maps (LinearReLU takes features).
FEATURE_MAP_LEAVES = (ConvBNReLU, GlobalAvgPoolLinear, BatchNormReLU)
# What an earlier optimize() made: a second one leaves them (and what is inside them) as they are.
FUSED = FUSED_LEAVES + (BasicBlock, Bottleneck, Inception, PreActBasicBlock)
# Layers that have no fused form, with the reason the report gives.
LEFT_ALONE = {
    nn.MaxPool2d: "max pooling runs in PyTorch (channels_last)",
    nn.AdaptiveAvgPool2d: "adaptive average pooling runs in PyTorch (only a ResNet's or GoogLeNet's global pool "
                          "straight into its single nn.Linear fc fuses with it)",
    nn.Linear: "a Linear fuses inside an nn.Sequential run or as a ResNet's or GoogLeNet's head only",
    nn.ReLU: "a ReLU fuses only into the convolution or Linear just before it in a fused run",
    nn.Dropout: "dropout is the identity in eval mode",
    nn.Flatten: "flatten is a view or a copy, not a kernel",
}


def modules(count: int) -> str:
    return f"{count} module" + ("" if count == 1 else "s")


@dataclass
class FusionReport:
    fused: list[tuple[str, str]] = field(default_factory=list)  # (name, what it became)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    already_fused: list[str] = field(default_factory=list)  # fused by an earlier optimize()

    def __str__(self) -> str:
        lines = [f"fused {modules(len(self.fused))}:"]
        lines += [f"  {name}: {what}" for name, what in self.fused]
        if self.already_fused:
            lines.append(f"already fused by an earlier optimize(): {modules(len(self.already_fused))}")
        lines.append(f"left alone {modules(len(self.left_alone))}:")
        lines += [f"  {name}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


class ModelInput:
    """Forward pre-hook: converts the floating tensors among a model's inputs, positional or
    keyword, to its dtype, and the 4-D ones to channels_last where it has a fused module that takes
    feature maps, once, at the boundary. The dtype is `leaf`'s weight's where the model has a fused
    module (so that it follows a later model.to(dtype)), else `dtype`; None (no dtype= given to
    optimize) casts nothing."""

    installed_by_optimize = True  # not a hook a second optimize() must keep a part unfused for

    def __init__(self, dtype, leaf=None, channels_last=False):
        self.dtype, self.leaf, self.channels_last = dtype, leaf, channels_last

    def convert(self, value, dtype):
        # Inside the lists, tuples (named too) and dicts a model may take as well.
        if isinstance(value, dict):
            converted = copy.copy(value)  # a dict subclass keeps what it holds besides its items
            converted.update((key, self.convert(item, dtype)) for key, item in value.items())
            return converted
        if isinstance(value, (list, tuple)):
            items = [self.convert(item, dtype) for item in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if not isinstance(value, torch.Tensor):
            return value
        # Integer inputs are not cast: the first fused op rejects them with a TypeError.
        x = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        # Without a fused module that takes feature maps (nothing fused, or an MLP's linear layers
        # only), the input keeps its layout: the model's own code may .view it.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def __call__(self, module, args, kwargs):
        dtype = self.leaf.weight.dtype if self.dtype is not None and self.leaf is not None else self.dtype
        return (tuple(self.convert(value, dtype) for value in args),
                {name: self.convert(value, dtype) for name, value in kwargs.items()})


def optimize(model: nn.Module, *, dtype=None, backend=None, inplace=False, verbose=False) -> nn.Module:
    """Returns `model` with its blocks fused (a copy unless inplace=True; a known block given as the
    model itself is returned as its fused form, a new module, either way).

    The model must be in eval mode with running BatchNorm statistics (BN is folded, once, in
    float32). dtype: the compute dtype of the result (default: the model's own); backend: the
    cnnfast backend of every fused op, "triton", "cuda" or "torch" (None: the default of the input's
    device, per op and conv layer, "torch_triton" and "cudnn_fused" among its choices for a conv);
    the modules an earlier optimize() fused take the dtype and the backend given now (None keeps theirs).
    What was fused and what was left alone is in `model.cnnfast_report` (printed with verbose=True).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("optimize: a TorchScript module cannot be changed; optimize the eager model, then "
                        "torch.jit.trace, torch.export or torch.compile the result (torch.jit.script cannot compile "
                        "the fused ops' Python)")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        more = f" and {len(training) - 3} more" if len(training) > 3 else ""
        raise RuntimeError(
            f"optimize: the model is in training mode ({', '.join(training[:3])}{more}); fused modules are for "
            "inference: call model.eval() first"
        )
    for name, m in model.named_modules():
        lazy = [key for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                if nn.parameter.is_lazy(t)]
        if lazy:
            raise RuntimeError(f"optimize: {name or type(model).__name__} ({type(m).__name__}) has uninitialized "
                               f"{', '.join(lazy)}: run the model once on a sample input first, which sizes them")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise RuntimeError(f"optimize: BatchNorm {name!r} has no running statistics (track_running_stats=False)")
    if dtype is not None and dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"optimize: dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype is None:
        other = {p.dtype for p in model.parameters() if p.is_floating_point()} - set(ops.FLOAT_DTYPES)
        if other:
            raise TypeError(f"optimize: the model's parameters are {', '.join(map(str, sorted(other, key=str)))}; "
                            "the fused ops run float32, float16 and bfloat16: pass dtype= one of them")
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
        model = _fuse_root(model, dict(dtype=dtype, backend=backend), report)
        _cast(model, dtype)
    if backend is not None:  # what an earlier optimize() fused runs on the backend asked for now, too
        for module in model.modules():
            if isinstance(module, BACKEND_LEAVES):
                module.backend = backend
    model.eval()  # the fused blocks are built in training mode, like every new nn.Module
    for entry in _entry_points(model):
        _convert_inputs(entry, dtype)
    model.cnnfast_report = report
    if verbose:
        print(report)
    return model


def _entry_points(model: nn.Module) -> list:
    """The modules that take the model's inputs: the model, or, for a container without a forward
    (an nn.ModuleDict or nn.ModuleList), the modules in it, which its user calls."""
    if type(model).forward is not nn.Module.forward:
        return [model]
    return [entry for child in model.children() for entry in _entry_points(child)]


def _convert_inputs(module: nn.Module, dtype) -> None:
    """Gives module its ModelInput hook, replacing an earlier optimize()'s."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, ModelInput):
            # Without a dtype now, the module keeps the one it was given: its input is still cast to it.
            dtype = dtype if dtype is not None else hook.dtype
            del module._forward_pre_hooks[key]
    leaf = next((m for m in module.modules() if isinstance(m, FUSED_LEAVES) and hasattr(m, "weight")), None)
    feature_maps = any(isinstance(m, FEATURE_MAP_LEAVES) for m in module.modules())
    module.register_forward_pre_hook(ModelInput(dtype, leaf, feature_maps), with_kwargs=True)


def _fuse_root(model: nn.Module, options: dict, report: FusionReport) -> nn.Module:
    """The model with its parts fused in place; a known block given as the model itself (a
    BasicBlock, an Inception) is replaced by its fused form, a new module, with inplace=True too.
    The model itself is reported under its class name."""
    name = type(model).__name__
    if isinstance(model, FUSED):
        report.already_fused.append(name)
        return model
    try:
        fused = _fuse_block(model, name, options)
    except NotImplementedError as error:
        report.left_alone.append((name, str(error)))
        return model
    if fused is not None:
        report.fused.append((name, f"{name} -> fused {type(fused).__name__}"))
        return fused
    if next(model.children(), None) is None:  # a lone layer: no run or block to fuse it in
        report.left_alone.append((name, _reason_left_alone(model)))
        return model
    _fuse_tree(model, "", options, report)
    return model


def _fuse_tree(module: nn.Module, prefix: str, options: dict, report: FusionReport, seen=None) -> None:
    """Fuses module's parts in place. seen: id of each child met so far -> (its name, what replaced
    it, its report list or None for a container, its entry's text), so that a module in two places
    (nn.Sequential(block, block)) gets one fused form for both, reported in both."""
    seen = {} if seen is None else seen
    _fuse_model_level(module, prefix, options, report)
    if computes_as(module, nn.Sequential):  # a subclass with its own forward may use a layer's output twice
        _fuse_sequential(module, prefix, options, report)
    reported = {name for name, _ in report.fused + report.left_alone}
    # Not named_children(): it names a module used twice once, and the second place would stay unfused.
    for name, child in list(module._modules.items()):
        full = f"{prefix}{name}"
        if child is None or full in reported or isinstance(child, (nn.Identity, Absorbed)):  # a stem or head part
            continue
        if id(child) in seen:
            first, replacement, entries, text = seen[id(child)]
            setattr(module, name, replacement)
            if entries is report.already_fused:
                entries.append(full)
            elif entries is not None:
                entries.append((full, f"{text} (the same module as {first})"))
            else:
                report.left_alone.append((full, f"the same module as {first}, whose parts are reported there"))
            continue
        replacement, entries, text = _fuse_child(child, full, options, report, seen)
        seen[id(child)] = (full, replacement, entries, text)
        if replacement is not child:
            setattr(module, name, replacement)


def _fuse_child(child: nn.Module, name: str, options: dict, report: FusionReport, seen: dict):
    """Fuses one child and reports it: (what replaces it, the report list it went to or None for a
    container whose parts were reported, its entry's text)."""
    if isinstance(child, FUSED):
        report.already_fused.append(name)
        return child, report.already_fused, None
    try:
        fused = _fuse_block(child, name, options)
    except NotImplementedError as error:  # e.g. a ResNeXt Bottleneck's grouped conv
        report.left_alone.append((name, str(error)))
        return child, report.left_alone, str(error)
    if fused is not None:
        text = f"{type(child).__name__} -> fused {type(fused).__name__}"
        report.fused.append((name, text))
        return fused, report.fused, text
    if next(child.children(), None) is not None:
        _fuse_tree(child, f"{name}.", options, report, seen)
        return child, None, None
    text = _reason_left_alone(child)
    report.left_alone.append((name, text))
    return child, report.left_alone, text


def _fuse_block(child: nn.Module, name: str, options: dict):
    """The fused form of a known block, None for any other module (a subclass of a known block that
    overrides how it computes, an SE block say, is another module); NotImplementedError, with the
    reason, for a known block with a part that has no fused form or with hooks."""
    if computes_as(child, TvBasicBlock):
        return BasicBlock.from_torchvision(child, name=name, **options)
    if computes_as(child, TvBottleneck):
        return Bottleneck.from_torchvision(child, name=name, **options)
    if computes_as(child, TvInception):
        return Inception.from_torchvision(child, name=name, **options)
    if computes_as(child, TvBasicConv2d):  # its forward applies F.relu itself
        check_no_hooks(name, child)
        return ConvBNReLU.from_modules(child.conv, child.bn, True, name=name, **options)
    if computes_as(child, preact.PreActBasicBlock):
        return PreActBasicBlock.from_module(child, name=name, **options)
    return None


def _fuse_model_level(module: nn.Module, prefix: str, options: dict, report: FusionReport) -> None:
    """The parts of a model that live as separate attributes rather than in one block: stems and heads.
    Only for the models' own forward: a subclass that overrides it may use these parts otherwise, and
    a part called on its own by other code computes what it did before (ModelForward)."""
    resnet = computes_as(module, TvResNet)
    preact_resnet = computes_as(module, preact.PreActResNet)
    # Already fused parts are skipped: a second optimize() of a fused model changes nothing.
    stem = (resnet or preact_resnet) and not isinstance(module.conv1, ConvBNReLU) and _fuse_part(
        report, f"{prefix}conv1", f"{type(module.conv1).__name__} + {type(module.bn1).__name__} + ReLU -> ConvBNReLU",
        lambda: ConvBNReLU.from_modules(module.conv1, module.bn1, module.relu, name=f"{prefix}conv1", **options))
    final = preact_resnet and not isinstance(module.bn_final, BatchNormReLU) and _fuse_part(
        report, f"{prefix}bn_final", f"{type(module.bn_final).__name__} + ReLU -> BatchNormReLU",
        lambda: BatchNormReLU.from_modules(module.bn_final, module.relu, name=f"{prefix}bn_final"))
    fused_head = None
    if (resnet or preact_resnet or computes_as(module, TvGoogLeNet)) and _is_global_pool_linear(module):
        # forward() runs avgpool -> flatten -> [dropout] -> fc: pooling and fc become one op.
        def head():
            check_no_hooks(f"{prefix}avgpool", module.avgpool, getattr(module, "dropout", None))
            return GlobalAvgPoolLinear.from_modules(module.fc, name=f"{prefix}fc", **options)

        fused_head = _fuse_part(report, f"{prefix}avgpool", "AdaptiveAvgPool2d + Linear -> GlobalAvgPoolLinear", head)
    # relu: its uses (the stem's, and the pre-activated head's) are all fused only then.
    relu_absorbed = stem and (final or resnet)
    if not (stem or final or fused_head):
        return
    model_forward = installed_forward(module)
    rewired = {}
    if stem:
        rewired.update(conv1=stem, bn1=nn.Identity())  # bn1 between conv1 and relu: the identity wherever it runs
    if final:
        final.model_forward = model_forward
        rewired.update(bn_final=final)
    if relu_absorbed:
        rewired.update(relu=Absorbed("conv1 and bn_final" if preact_resnet else "conv1", model_forward))
    if fused_head:
        fused_head.model_forward = model_forward
        rewired.update(avgpool=fused_head, fc=Absorbed("avgpool", model_forward, head=fused_head))
        if "dropout" in module._modules:  # GoogLeNet's, which its forward would now run on the logits
            rewired.update(dropout=module.dropout)
    for name, part in rewired.items():
        setattr(module, name, part)
    model_forward.parts.update({name: type(part) for name, part in rewired.items()})


def _fuse_part(report: FusionReport, name: str, what: str, build):
    """build()'s fused module, reported as fused; None, with the reason reported, where build
    raises NotImplementedError (a part with no fused form stays as it is)."""
    try:
        fused = build()
    except NotImplementedError as error:
        report.left_alone.append((name, str(error)))
        return None
    report.fused.append((name, what))
    return fused


def _is_global_pool_linear(model: nn.Module) -> bool:
    """Whether the head is a global average pool and one nn.Linear with nothing between them but
    GoogLeNet's dropout (the identity in eval mode): not a replaced fc, a pool to 2x2, a pool subclass
    that computes otherwise, or another module in the dropout's place (the fused head would move it
    after the fc)."""
    pool = model.avgpool
    between = model.dropout if computes_as(model, TvGoogLeNet) else None
    return (computes_as(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
            and type(model.fc) is nn.Linear and computes_as(model.fc, nn.Linear)
            and (between is None or computes_as(between, nn.Dropout) or computes_as(between, nn.Identity)))


def _fuse_sequential(seq: nn.Sequential, prefix: str, options: dict, report: FusionReport) -> None:
    """Conv2d -> [BatchNorm2d] -> [ReLU] and Linear -> [ReLU] runs; the absorbed layers become nn.Identity,
    so the indices (and the names of the layers that stay) do not move."""
    names, layers = list(seq._modules), list(seq)
    for i, layer in enumerate(layers):
        conv = computes_as(layer, nn.Conv2d) and unsupported_reason(layer) is None
        if not (conv or computes_as(layer, nn.Linear)):
            continue
        run = [i]
        j = i + 1
        bn = relu = None
        if conv and j < len(layers) and is_foldable_norm(layers[j]):
            bn = layers[j]
            run.append(j)
            j += 1
        if j < len(layers) and computes_as(layers[j], nn.ReLU):
            relu = layers[j]
            run.append(j)
        try:
            if conv:
                fused = ConvBNReLU.from_modules(layer, bn, relu, name=f"{prefix}{names[i]}", **options)
            else:
                fused = LinearReLU.from_modules(layer, relu, name=f"{prefix}{names[i]}", **options)
        except NotImplementedError as error:  # a part with hooks
            report.left_alone.append((f"{prefix}{names[i]}", str(error)))
            continue
        seq[i] = fused
        for k in run[1:]:
            seq[k] = nn.Identity()
        parts = " + ".join(type(layers[k]).__name__ for k in run)
        report.fused.append((f"{prefix}{names[i]}", f"{parts} -> {type(fused).__name__}"))


def _reason_left_alone(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        return unsupported_reason(layer) or "a Conv2d outside an nn.Sequential run or a known block is not fused"
    if is_foldable_norm(layer):
        return "a BatchNorm folds only into the convolution it follows in a fused run; this one runs as it is"
    for kind, reason in LEFT_ALONE.items():
        if computes_as(layer, kind):  # a subclass with its own forward is another layer
            return reason
    return f"{type(layer).__name__} has no fused form; it runs as it is"


def _cast(model: nn.Module, dtype) -> None:
    """Casts every floating parameter and buffer to dtype (where given), but the fused modules'
    biases and BatchNormReLU's scale and shift, which stay float32 (applied in float32); makes the fused modules' 4-D
    ones channels_last (a module left alone keeps its layout: its code may .view its weight); and
    leaves no parameter requiring grad: the result is for inference, and a fused op refuses an
    input that requires grad, which an unfused layer's trainable weights would give it. A tensor
    that several modules share (tied weights) becomes one new tensor that they share."""
    done = {}
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not tensor.is_floating_point():
                continue
            keep_float32 = isinstance(module, BatchNormReLU) or (isinstance(module, FUSED_LEAVES) and name == "bias")
            channels_last = tensor.dim() == 4 and isinstance(module, FUSED_LEAVES)
            key = (id(tensor), keep_float32, channels_last)
            if key not in done:
                # .float(): a model.to(float16) between two optimize() calls rounded these too.
                converted = tensor.float() if keep_float32 else tensor.to(dtype) if dtype is not None else tensor.detach()
                if channels_last:
                    converted = converted.contiguous(memory_format=torch.channels_last)
                if isinstance(tensor, nn.Parameter):
                    converted = nn.Parameter(converted, requires_grad=False)
                done[key] = (tensor, converted)  # the tensor kept alive: its id stays its own
            setattr(module, name, done[key][1])
