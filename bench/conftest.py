import pytest
import torch


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written: the memory
    ceiling the memory-bound benchmarks are measured against."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() / (ms * 1e-3)
