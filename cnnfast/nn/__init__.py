"""Drop-in fused modules: each runs its convolution, BatchNorm, residual add and ReLU through cnnfast.ops."""
from cnnfast.nn.blocks import BasicBlock, BatchNormReLU, Bottleneck, Inception, PreActBasicBlock
from cnnfast.nn.conv import ConvBNReLU, GlobalAvgPoolLinear, LinearReLU

__all__ = [
    "BasicBlock", "BatchNormReLU", "Bottleneck", "ConvBNReLU", "GlobalAvgPoolLinear", "Inception", "LinearReLU",
    "PreActBasicBlock",
]
