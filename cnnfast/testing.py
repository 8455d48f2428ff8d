"""The tolerance table (per comparison kind and dtype) and comparisons against a float64 reference."""
import torch

# (rtol, atol) by kind of op and dtype; integer-valued inputs are compared exactly instead.
TOLERANCES = {
    ("conv", torch.float32): (1e-4, 1e-4),
    ("elementwise", torch.float32): (1.3e-6, 1e-5),  # add, ReLU, global average pooling
    ("tf32", torch.float32): (5e-3, 5e-3),
    (None, torch.float16): (1e-3, 5e-3),
    (None, torch.bfloat16): (1.6e-2, 1e-2),
}


def tolerance(kind: str, dtype: torch.dtype):
    """(rtol, atol) for an op of `kind` ("conv", "elementwise", "tf32") producing `dtype`."""
    if dtype == torch.float32:
        return TOLERANCES[(kind, dtype)]
    return TOLERANCES[(None, dtype)]


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, kind: str, *, exact: bool = False):
    """Compares an op's output with a float64 reference; NaN must match NaN (pre-filled outputs
    that a kernel never wrote show up as NaN where the reference has a number)."""
    assert actual.shape == reference.shape, f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
    assert reference.dtype == torch.float64, f"the reference is {reference.dtype}, not float64"
    rtol, atol = (0.0, 0.0) if exact else tolerance(kind, actual.dtype)
    torch.testing.assert_close(actual.double().cpu(), reference.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)
