"""Builders for the classic CNNs, with torchvision's state_dict keys.

Every builder takes ``(num_classes=1000, *, fused=False)`` and returns an untrained plain PyTorch
model; those built on torchvision's take ``**kwargs`` too, for the torchvision constructor. ``fused=True``
returns it in eval mode, optimized by ``cnnfast.optimize`` (BatchNorm folded, blocks fused).
All of them can be called under ``with torch.device("meta"):`` to get a model without memory,
for shape and FLOP analysis.
"""
from torch import nn
from torchvision import models as tv

from cnnfast.models.preact import PreActResNet
from cnnfast.models.preact import preact_resnet18 as _preact_resnet18
from cnnfast.models.preact import preact_resnet34 as _preact_resnet34
from cnnfast.models.zfnet import ZFNet


def _finish(model: nn.Module, fused: bool) -> nn.Module:
    if not fused:
        return model
    from cnnfast.convert import optimize

    return optimize(model.eval(), inplace=True)


def alexnet(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.alexnet(weights=None, num_classes=num_classes, **kwargs), fused)


def zfnet(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(ZFNet(num_classes=num_classes, **kwargs), fused)


def vgg16(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.vgg16(weights=None, num_classes=num_classes, **kwargs), fused)


def vgg19(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.vgg19(weights=None, num_classes=num_classes, **kwargs), fused)


def vgg16_bn(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.vgg16_bn(weights=None, num_classes=num_classes, **kwargs), fused)


def vgg19_bn(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.vgg19_bn(weights=None, num_classes=num_classes, **kwargs), fused)


def googlenet(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    """GoogLeNet's inference path: no auxiliary classifiers, no input transform. It is torchvision's
    GoogLeNet, as ARCHITECTURE_NOTES["googlenet"] says how it differs from the paper's. For
    torchvision's trained weights, which hold the auxiliary heads and expect its input transform:
    googlenet(aux_logits=True, transform_input=True), which loads them strictly."""
    kwargs.setdefault("aux_logits", False)
    kwargs.setdefault("init_weights", False)
    kwargs.setdefault("transform_input", False)
    return _finish(tv.googlenet(weights=None, num_classes=num_classes, **kwargs), fused)


def resnet18(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.resnet18(weights=None, num_classes=num_classes, **kwargs), fused)


def resnet34(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.resnet34(weights=None, num_classes=num_classes, **kwargs), fused)


def resnet50(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.resnet50(weights=None, num_classes=num_classes, **kwargs), fused)


def resnet101(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.resnet101(weights=None, num_classes=num_classes, **kwargs), fused)


def resnet152(num_classes: int = 1000, *, fused: bool = False, **kwargs) -> nn.Module:
    return _finish(tv.resnet152(weights=None, num_classes=num_classes, **kwargs), fused)


def preact_resnet18(num_classes: int = 1000, *, fused: bool = False) -> nn.Module:
    """Pre-activation ResNet-18 (cnnfast.models.preact)."""
    return _finish(_preact_resnet18(num_classes), fused)


def preact_resnet34(num_classes: int = 1000, *, fused: bool = False) -> nn.Module:
    """Pre-activation ResNet-34 (cnnfast.models.preact)."""
    return _finish(_preact_resnet34(num_classes), fused)


ARCHITECTURES = {
    "alexnet": alexnet,
    "zfnet": zfnet,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "googlenet": googlenet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}

# The lecture's AlexNet table starts from 3x227x227; torchvision's AlexNet (64 conv1 filters)
# reproduces that table exactly at 227. Everything else is specified at 224.
DEFAULT_INPUT_SIZE = {name: 227 if name == "alexnet" else 224 for name in ARCHITECTURES}


# Where a builder's model is not the one the lecture describes: said wherever its counts are shown.
ARCHITECTURE_NOTES = {
    "googlenet": "torchvision's GoogLeNet: BatchNorm after every conv (the lecture's had none; BN adds no MACs) "
                 "and, in each Inception module, a 3x3 conv where the paper's branch has a 5x5: at 224x224 it counts "
                 "1.50 GMACs and 6.62 M parameters, where 5x5 convs there would give 1.58 and 7.01",
    "zfnet": "the lecture's ZFNet: conv3, conv4 and conv5 have 512, 1024 and 512 filters (the paper's Table 2 "
             "variant) where the 2013 paper's main model has 384, 384 and 256, which doubles the first linear "
             "layer's inputs (18432, not 9216) and so its weights",
    **{name: "torchvision's ResNet v1.5: a downsampling bottleneck strides in its 3x3 conv, not in its first 1x1 "
             "as the paper's v1 does, so that 1x1 runs at the full resolution: "
             f"{macs} GMACs at 224x224 against the paper's {paper}"
       for name, macs, paper in (("resnet50", "4.09", "3.8"), ("resnet101", "7.80", "7.6"),
                                 ("resnet152", "11.51", "11.3"))},
    **{name: "VGG with BatchNorm after every conv, which the lecture's VGG did not have (BN adds parameters, "
             "no MACs)" for name in ("vgg16_bn", "vgg19_bn")},
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the architecture called ``name`` (a key of ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)


__all__ = [
    "ARCHITECTURES", "ARCHITECTURE_NOTES", "DEFAULT_INPUT_SIZE", "PreActResNet", "ZFNet", "get_model", "preact_resnet18", "preact_resnet34",
    *ARCHITECTURES,
]
