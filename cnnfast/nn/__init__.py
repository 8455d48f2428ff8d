"""Drop-in fused modules: the convolutions (with the folded BatchNorm, the residual add and the ReLU
in their epilogue), linear layers and pooling run through cnnfast.ops; a pre-activation block's
BatchNorm + ReLU (BatchNormReLU) and a part called on its own after optimize() fused it (Absorbed)
run as PyTorch's ops."""
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
