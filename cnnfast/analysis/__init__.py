"""Per-layer parameters, MACs and memory of the classic CNNs, and the lecture's claims about them."""
from cnnfast.analysis.claims import Claim, compute_claims
from cnnfast.analysis.counter import (
    MEMORY_TYPES,
    LayerInfo,
    ModelAnalysis,
    analyze,
    analyze_arch,
    format_table,
)

__all__ = [
    "MEMORY_TYPES",
    "Claim",
    "LayerInfo",
    "ModelAnalysis",
    "analyze",
    "analyze_arch",
    "compute_claims",
    "format_table",
]
