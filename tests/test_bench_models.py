"""bench/bench_models.py's correctness check, on the CPU: the models it times have BatchNorm
statistics worth folding, and check_logits passes a fused model and fails a wrong one."""
import copy

import pytest
import torch

import cnnfast
from bench.bench_models import BFLOAT16_ATOL, check_logits, logits_error, plain_model
from cnnfast.models import get_model


@pytest.fixture(scope="module")
def resnet18_logits():
    """(the model, a channels_last bfloat16 batch, eager bfloat16's logits, float64's) of
    plain_model("resnet18") at 64x64."""
    model = plain_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = copy.deepcopy(model).to(torch.bfloat16, memory_format=torch.channels_last)(x)
        reference = copy.deepcopy(model).double()(x.double())
    return model, x, eager, reference


def test_the_benchmarked_models_have_batch_norm_statistics_to_fold():
    bns = [m for m in plain_model("resnet18").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not plain_model("resnet18").training
    for bn in bns:
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))


def test_check_logits_passes_the_fused_model(resnet18_logits):
    model, x, eager, reference = resnet18_logits
    with torch.no_grad():
        fused = cnnfast.optimize(model, dtype=torch.bfloat16)(x)
    error, eager_error = check_logits(fused, eager, reference)
    assert 0 < error <= max(2 * eager_error, BFLOAT16_ATOL)
    assert logits_error(reference.float(), reference) < 1e-6


def test_check_logits_fails_wrong_logits(resnet18_logits):
    model, x, eager, reference = resnet18_logits
    with pytest.raises(AssertionError, match="off float64"):
        check_logits(torch.zeros_like(eager), eager, reference)
    # The same weights with BatchNorm as initialised (0, 1, 1, 0): what a folding that ignored
    # the statistics would give.
    torch.manual_seed(0)  # as plain_model draws them
    with torch.no_grad():
        unfolded = cnnfast.optimize(get_model("resnet18").eval(), dtype=torch.bfloat16)(x)
    with pytest.raises(AssertionError, match="off float64"):
        check_logits(unfolded, eager, reference)
    with pytest.raises(AssertionError, match="no bar to compare with"):
        check_logits(eager, torch.zeros_like(eager), reference)
