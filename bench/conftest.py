import pytest
import torch


@pytest.fixture(scope="session")
def copy_bandwidth():
    """The device's copy bandwidth in bytes/s (read + written), the ceiling of the memory-bound
    benchmarks: cnnfast.roofline's cached measurement, the one the roofline reports use."""
    from cnnfast.roofline import ceilings

    return ceilings("cuda", torch.bfloat16)["copy_bytes_per_s"]
