"""The precision PyTorch lets float32 work run in on a GPU, which cnnfast's kernels follow."""
import torch


def tf32_allowed(op: str) -> bool:
    """Whether PyTorch lets float32 `op` run as TF32 on a GPU: "conv" (cuDNN's convolutions, whose
    setting cnnfast's Triton and CUTLASS convolutions follow) or "matmul" (cuBLAS's, which the
    classifier head's GEMM follows).

    The legacy flag (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) is
    read first: torch.compile traces it, and it agrees with the per-op settings whenever it
    answers. It raises once those settings (torch.backends.cudnn.conv.fp32_precision, ...) have been
    set apart from each other; then they are read as PyTorch resolves them, most specific first,
    "none" deferring to the next."""
    legacy, specific = {"conv": (torch.backends.cudnn, torch.backends.cudnn.conv),
                        "matmul": (torch.backends.cuda.matmul, torch.backends.cuda.matmul)}[op]
    try:
        return legacy.allow_tf32
    except RuntimeError:
        for setting in (specific, torch.backends.cudnn, torch.backends):
            if setting.fp32_precision != "none":
                return setting.fp32_precision == "tf32"
        return False
