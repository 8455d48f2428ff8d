"""The precision PyTorch lets float32 work run in on a GPU, which cnnfast's kernels follow."""
import torch


def tf32_allowed(op: str) -> bool:
    """Whether PyTorch lets float32 `op` run as TF32 on a GPU: "conv" (cuDNN's convolutions, whose
    setting cnnfast's Triton and CUTLASS convolutions follow) or "matmul" (cuBLAS's, which the
    classifier head's GEMM follows).

    The legacy flag (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) is
    read where it answers: it agrees with the per-op settings then, and torch.compile traces it (and
    recompiles when it changes). It raises once those settings (torch.backends.cudnn.conv.
    fp32_precision, ...) have been set apart from each other; then they are read as PyTorch resolves
    them (resolved_tf32), which torch.compile takes as a constant of the graph: a later change of
    them needs torch._dynamo.reset() to be seen there."""
    if torch.compiler.is_compiling():  # dynamo fails on the flag's raise rather than let it be caught
        return resolved_tf32(op) if legacy_flag_raises(op) else legacy_settings(op).allow_tf32
    try:
        return legacy_settings(op).allow_tf32
    except RuntimeError:
        return resolved_tf32(op)


def legacy_settings(op: str):
    """The module whose allow_tf32 is op's legacy flag."""
    return torch.backends.cudnn if op == "conv" else torch.backends.cuda.matmul


@torch.compiler.assume_constant_result
def legacy_flag_raises(op: str) -> bool:
    """Whether op's legacy TF32 flag raises (its per-op settings were set apart)."""
    try:
        legacy_settings(op).allow_tf32
    except RuntimeError:
        return True
    return False


@torch.compiler.assume_constant_result
def resolved_tf32(op: str) -> bool:
    """op's TF32 setting as PyTorch resolves the per-op ones: most specific first (the op's, then
    CUDA's, torch.backends.cudnn.fp32_precision, then the generic one), "none" deferring to the next."""
    specific = {"conv": torch.backends.cudnn.conv, "matmul": torch.backends.cuda.matmul}[op]
    for setting in (specific, torch.backends.cudnn, torch.backends):
        if setting.fp32_precision != "none":
            return setting.fp32_precision == "tf32"
    return False
