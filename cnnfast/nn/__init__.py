"""Drop-in fused modules: each runs its convolution, BatchNorm, residual add and ReLU through cnnfast.ops."""
from cnnfast.nn.absorbed import Absorbed
from cnnfast.nn.blocks import BasicBlock, BatchNormReLU, Bottleneck, Inception, PreActBasicBlock
from cnnfast.nn.conv import ConvBNReLU, GlobalAvgPoolLinear, LinearReLU

# The modules a torch.fx tracer must take as leaves: their forwards check their inputs' shapes,
# which symbolic tracing cannot branch on (Tracer.is_leaf_module; create_feature_extractor's
# tracer_kwargs={"leaf_modules": [...]}). The blocks made of them trace through.
FX_LEAF_MODULES = (Absorbed, BatchNormReLU, ConvBNReLU, GlobalAvgPoolLinear, Inception, LinearReLU)

__all__ = [
    "Absorbed", "BasicBlock", "BatchNormReLU", "Bottleneck", "ConvBNReLU", "FX_LEAF_MODULES", "GlobalAvgPoolLinear",
    "Inception", "LinearReLU", "PreActBasicBlock",
]
