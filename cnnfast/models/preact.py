"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The lecture's "ReLU position" section: a post-activation block ends with ReLU(F(x) + x), so its
output is never negative and cannot carry an identity; a pre-activation block computes
BN -> ReLU -> conv -> BN -> ReLU -> conv and adds the shortcut last, leaving the sum untouched.

Layout, at 224x224: a 7x7/2 stem conv with BN and ReLU and a 3x3/2 max pool (as in ResNet v1),
four stages of pre-activation basic blocks with ResNet-18/34's widths and depths, then the final
BN -> ReLU that the last block's output still needs, global average pooling and one linear layer.
A block that changes width or resolution takes its 1x1 projection shortcut from the
pre-activated input, as the paper does. The first block takes the stem's activated output as its
pre-activation, without a BN -> ReLU of its own (the paper's appendix: the first unit follows a
stand-alone conv1 with its BN and ReLU; its reference code builds that unit without pre-activation).
"""
import torch
from torch import nn


class PreActBasicBlock(nn.Module):
    """preactivate=False: the input is already activated (the first block, after the stem), so the
    block has no bn1 and its convolution reads the input as it is."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, preactivate: bool = True):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels) if preactivate else None
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x)) if self.bn1 is not None else x
        shortcut = self.downsample(pre) if self.downsample is not None else x
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, depths: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_channels = [], 64
        for index, (channels, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for block in range(depth):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(PreActBasicBlock(in_channels, channels, stride, preactivate=index > 0 or block > 0))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(512)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.relu(self.bn_final(x)))
        return self.fc(torch.flatten(x, 1))


def preact_resnet18(num_classes: int = 1000) -> PreActResNet:
    return PreActResNet([2, 2, 2, 2], num_classes)


def preact_resnet34(num_classes: int = 1000) -> PreActResNet:
    return PreActResNet([3, 4, 6, 3], num_classes)
