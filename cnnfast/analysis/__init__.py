"""Per-layer parameters, MACs and memory of the classic CNNs, and the lecture's claims about them."""
from cnnfast.analysis.claims import Claim, compute_claims
from cnnfast.analysis.counter import (
    MEMORY_TYPES,
    ConvProblem,
    LayerInfo,
    ModelAnalysis,
    analyze,
    analyze_arch,
    conv_problems,
    format_table,
)

__all__ = [
    "MEMORY_TYPES",
    "Claim",
    "ConvProblem",
    "LayerInfo",
    "ModelAnalysis",
    "analyze",
    "analyze_arch",
    "compute_claims",
    "conv_problems",
    "format_table",
]
