"""Fused residual blocks and the Inception module.

Each keeps the attribute names of the block it replaces (conv1, conv2, conv3, downsample,
branch1..branch4), so a layer is found under the same name before and after fusion.
"""
import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d as TvBasicConv2d
from torchvision.models.googlenet import Inception as TvInception
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck

from cnnfast import ops
from cnnfast.models import preact
from cnnfast.nn.conv import (
    ConvBNReLU, called_on_its_own, check_computes_as, check_foldable, check_inference, check_no_hooks, check_relu,
    compute_dtype, computes_as,
)


def _fuser(name, dtype, backend, block, cls, what):
    """fuse(conv, bn, relu, part): the ConvBNReLU of block `name`'s part `part`, once `block` is
    known to be a cls that computes as cls does, with no hooks (which the fused block would drop)."""
    check_computes_as(block, cls, name, what)
    check_no_hooks(name, block)

    def fuse(conv, bn, relu, part):
        return ConvBNReLU.from_modules(conv, bn, relu, dtype=dtype, backend=backend, name=f"{name}.{part}")

    return fuse


class BasicBlock(nn.Module):
    """ResNet-18/34's block: conv1 (+BN+ReLU), then conv2 whose epilogue adds the shortcut and applies the ReLU."""

    def __init__(self, conv1: ConvBNReLU, conv2: ConvBNReLU, downsample: ConvBNReLU | None):
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample

    @classmethod
    def from_torchvision(cls, block, *, dtype=None, backend=None, name="block"):
        fuse = _fuser(name, dtype, backend, block, TvBasicBlock, "torchvision's BasicBlock")
        return cls(fuse(block.conv1, block.bn1, block.relu, "conv1"), fuse(block.conv2, block.bn2, block.relu, "conv2"),
                   _downsample(block.downsample, fuse, name))

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        return self.conv2(self.conv1(x), residual=shortcut)


class Bottleneck(nn.Module):
    """ResNet-50/101/152's block: 1x1 reduce, 3x3, 1x1 expand whose epilogue adds the shortcut and applies the ReLU."""

    def __init__(self, conv1: ConvBNReLU, conv2: ConvBNReLU, conv3: ConvBNReLU, downsample: ConvBNReLU | None):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.downsample = conv1, conv2, conv3, downsample

    @classmethod
    def from_torchvision(cls, block, *, dtype=None, backend=None, name="block"):
        fuse = _fuser(name, dtype, backend, block, TvBottleneck, "torchvision's Bottleneck")
        return cls(fuse(block.conv1, block.bn1, block.relu, "conv1"), fuse(block.conv2, block.bn2, block.relu, "conv2"),
                   fuse(block.conv3, block.bn3, block.relu, "conv3"), _downsample(block.downsample, fuse, name))

    def forward(self, x):
        shortcut = self.downsample(x) if self.downsample is not None else x
        return self.conv3(self.conv2(self.conv1(x)), residual=shortcut)


def _downsample(downsample, fuse, name):
    """torchvision's projection shortcut, Sequential(conv 1x1, BatchNorm), as one fused conv without
    ReLU; NotImplementedError for any other shortcut (a ResNet-D's average pool first, say)."""
    if downsample is None:
        return None
    if not computes_as(downsample, nn.Sequential) or len(downsample) != 2:
        raise NotImplementedError(f"{name}.downsample: only a Sequential(Conv2d, BatchNorm2d) shortcut is fused")
    conv, bn = downsample
    return fuse(conv, bn, False, "downsample")


class BatchNormReLU(nn.Module):
    """relu(bn(x)) of an eval-mode BatchNorm as one multiply-add and a ReLU: the pre-activation
    that cannot ride in a conv epilogue because the block's input is also its shortcut.

    model_forward: set by optimize() where this is a model's bn_final with the model's relu fused
    in (an object whose `running` says whether the model's own forward is running). Called
    otherwise (other code's model.bn_final(x)), it is the BatchNorm it stands in for, no ReLU."""

    def __init__(self, bn: nn.BatchNorm2d, *, name="bn"):
        super().__init__()
        self.training = False  # inference only (check_inference)
        check_foldable(bn, name)
        self.channels = bn.running_mean.numel()
        # float32 whatever the activations' dtype, as the fused convolutions keep their biases.
        scale, shift = ops.batch_norm_scale_shift(bn)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))
        self.model_forward = None

    @classmethod
    def from_modules(cls, bn, relu, *, name="bn"):
        """relu(bn(x)) from the model's BatchNorm and activation module (or True): NotImplementedError
        where the activation is not a ReLU, TypeError for no ReLU (None, False), which it would add."""
        check_relu(relu, name)
        if not relu:
            raise TypeError(f"{name}: BatchNormReLU always applies a ReLU; relu must be an nn.ReLU or True, got "
                            f"{relu!r}")
        check_no_hooks(name, bn, relu)
        return cls(bn, name=name)

    def forward(self, x):
        check_inference(self)
        # addcmul would broadcast a 1-channel or 2-D input to a wrong-shaped result.
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"BatchNormReLU expects (N, {self.channels}, H, W) input, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"BatchNormReLU: input dtype {x.dtype} is not a floating dtype")
        # Like nn.BatchNorm2d, the output keeps x's dtype: float16 activations with float32 statistics
        # are computed in float32 and rounded once.
        y = torch.addcmul(self.shift, x, self.scale).to(x.dtype)
        return y if called_on_its_own(self.model_forward) else torch.relu(y)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class PreActBasicBlock(nn.Module):
    """Pre-activation block: BN1+ReLU (an Identity in the first block, whose input is already
    activated), then conv1 with BN2 folded in and the ReLU in its epilogue, then conv2 whose
    epilogue adds the shortcut (no ReLU after the sum)."""

    def __init__(self, pre: BatchNormReLU | nn.Identity, conv1: ConvBNReLU, conv2: ConvBNReLU,
                 downsample: ConvBNReLU | None):
        super().__init__()
        self.pre, self.conv1, self.conv2, self.downsample = pre, conv1, conv2, downsample

    @classmethod
    def from_module(cls, block, *, dtype=None, backend=None, name="block"):
        fuse = _fuser(name, dtype, backend, block, preact.PreActBasicBlock, "cnnfast.models' PreActBasicBlock")
        downsample = fuse(block.downsample, None, False, "downsample") if block.downsample is not None else None
        pre = (BatchNormReLU.from_modules(block.bn1, block.relu, name=f"{name}.bn1")
               if block.bn1 is not None else nn.Identity())
        return cls(pre, fuse(block.conv1, block.bn2, block.relu, "conv1"),
                   fuse(block.conv2, None, False, "conv2"), downsample)

    def forward(self, x):
        pre = self.pre(x)
        shortcut = self.downsample(pre) if self.downsample is not None else x
        return self.conv2(self.conv1(pre), residual=shortcut)


class Inception(nn.Module):
    """GoogLeNet's Inception module: the four branches write straight into channel slices of one
    channels_last output, so there is no torch.cat copy."""

    def __init__(self, branch1: ConvBNReLU, branch2: nn.Sequential, branch3: nn.Sequential, branch4: nn.Sequential):
        super().__init__()
        self.branch1, self.branch2, self.branch3, self.branch4 = branch1, branch2, branch3, branch4
        widths = [branch1.out_channels, branch2[-1].out_channels, branch3[-1].out_channels, branch4[-1].out_channels]
        self.out_channels = sum(widths)
        self.channel_ranges = [(sum(widths[:i]), sum(widths[: i + 1])) for i in range(4)]

    @classmethod
    def from_torchvision(cls, module, *, dtype=None, backend=None, name="inception"):
        """NotImplementedError for a module whose branches are not torchvision's (two BasicConv2d
        in each of branches 2 and 3; a pool, then one, in branch 4)."""
        fuse = _fuser(name, dtype, backend, module, TvInception, "torchvision's Inception")
        branches = (module.branch2, module.branch3, module.branch4)
        if not all(computes_as(branch, nn.Sequential) for branch in branches):
            raise NotImplementedError(f"{name}: a branch computes otherwise than its nn.Sequential's layers in turn")
        if [len(branch) for branch in branches] != [2, 2, 2]:
            raise NotImplementedError(f"{name}: branches 2 to 4 must have two layers each, as torchvision's have; "
                                      f"they have {', '.join(str(len(branch)) for branch in branches)}")
        parts = [module.branch1, *module.branch2, *module.branch3, module.branch4[1]]
        if not all(computes_as(part, TvBasicConv2d) for part in parts):
            raise NotImplementedError(f"{name}: a branch is not made of torchvision's BasicConv2d")

        def basic(basic_conv, part):  # torchvision's BasicConv2d: conv -> BN -> ReLU
            return fuse(basic_conv.conv, basic_conv.bn, True, part)

        return cls(
            basic(module.branch1, "branch1"),
            nn.Sequential(basic(module.branch2[0], "branch2.0"), basic(module.branch2[1], "branch2.1")),
            nn.Sequential(basic(module.branch3[0], "branch3.0"), basic(module.branch3[1], "branch3.1")),
            nn.Sequential(module.branch4[0], basic(module.branch4[1], "branch4.1")),
        )

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"Inception expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        # In the branches' dtype: under autocast x may be another, which each branch's first conv casts.
        out = torch.empty((n, self.out_channels, h, w), dtype=compute_dtype(x, self.branch1.weight), device=x.device,
                          memory_format=torch.channels_last)
        slices = [out[:, start:stop] for start, stop in self.channel_ranges]
        self.branch1(x, out=slices[0])
        self.branch2[1](self.branch2[0](x), out=slices[1])
        self.branch3[1](self.branch3[0](x), out=slices[2])
        self.branch4[1](self.branch4[0](x), out=slices[3])
        return out
