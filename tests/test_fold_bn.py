"""fold_bn: folding an eval-mode BatchNorm into the conv before it, against nn.BatchNorm2d in float64."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cnnfast import backends, ops
from cnnfast.testing import assert_close_to_reference, tolerance

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
K, C = 8, 5


def make_conv_bn(dtype, *, conv_bias=True, affine=True, running_var=None, gamma=None, mean_minus_bias=None):
    """A conv weight (and bias) in `dtype` and an eval-mode float32 BatchNorm with random statistics."""
    weight = (torch.randn(K, C, 3, 3) / math.sqrt(9 * C)).to(dtype)
    bias = torch.randn(K).to(dtype) if conv_bias else None
    bn = nn.BatchNorm2d(K, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(K) if mean_minus_bias is None else bias.float() + mean_minus_bias)
        bn.running_var.copy_(torch.rand(K) + 0.5 if running_var is None else running_var)
        if affine:
            bn.weight.copy_(torch.randn(K) if gamma is None else gamma)
            bn.bias.copy_(torch.randn(K))
    return weight, bias, bn


def reference_fold(weight, bias, bn):
    """The folded weight and bias in float64: w * gamma / sqrt(var + eps), beta + (b - mean) * gamma / sqrt(var + eps)."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = torch.zeros_like(scale)
    if bn.affine:
        scale, shift = scale * bn.weight.double(), bn.bias.double()
    conv_bias = torch.zeros_like(scale) if bias is None else bias.double()
    return weight.double() * scale.view(-1, 1, 1, 1), shift + (conv_bias - bn.running_mean.double()) * scale


def reference_conv_bn(x, weight, bias, bn):
    """bn(conv(x)) with the module itself, in float64."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    return copy.deepcopy(bn).double()(y)


@pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton kernel on CPU tensors")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv-bias", "no-conv-bias"])
def test_matches_eval_batchnorm(conv_bias, affine, dtype):
    """conv2d(x, folded weight, folded bias) == bn(conv2d(x, weight, bias)), the folded conv run by
    the Triton kernel in `dtype` with the float32 bias, as the fused modules run it."""
    torch.manual_seed(0)
    weight, bias, bn = make_conv_bn(dtype, conv_bias=conv_bias, affine=affine)
    folded_weight, folded_bias = ops.fold_bn(weight, bias, bn)
    assert folded_weight.dtype == dtype and folded_weight.shape == weight.shape
    assert folded_bias.dtype == torch.float32 and folded_bias.shape == (K,)
    x = torch.randn(2, C, 6, 7).to(dtype)
    out = ops.conv2d(x, folded_weight, folded_bias, padding=1, backend="triton")
    assert_close_to_reference(out, reference_conv_bn(x, weight, bias, bn), "conv")


EXTREMES = {  # name: (running_var, gamma); gamma "huge" is as large as the dtype holds after scaling
    "var-zero": (0.0, None),
    "var-small": (1e-4, None),  # eps (1e-5) moves the scale by 5%: dropped or doubled, it shows
    "var-tiny": (1e-30, None),
    "var-huge": (1e30, None),
    "gamma-huge": (1.0, "huge"),
    "var-zero-gamma-huge": (0.0, "huge"),
}
# float16: the folded weight must stay below 65504, and var 0 scales it by 1/sqrt(eps) = 316.
HUGE_GAMMA = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 100.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extreme", EXTREMES)
def test_extreme_statistics_stay_finite(extreme, dtype):
    torch.manual_seed(0)
    running_var, gamma = EXTREMES[extreme]
    gamma = HUGE_GAMMA[dtype] * (1 + torch.rand(K)) if gamma == "huge" else None
    weight, bias, bn = make_conv_bn(dtype, running_var=torch.full((K,), running_var), gamma=gamma)
    folded_weight, folded_bias = ops.fold_bn(weight, bias, bn)
    assert folded_weight.isfinite().all() and folded_bias.isfinite().all()
    expected_weight, expected_bias = reference_fold(weight, bias, bn)
    # The table's atol is for values of order one; these weights run from 1e-16 (var-huge, which a
    # zero weight would pass) to 1e30: atol scales with the largest weight, down to the dtype's
    # smallest normal number (float16's 6e-5: var-huge's weights are zero there).
    rtol, atol = tolerance("elementwise", dtype)
    atol = max(atol * expected_weight.abs().max().item(), torch.finfo(dtype).tiny)
    torch.testing.assert_close(folded_weight.double(), expected_weight, rtol=rtol, atol=atol)
    assert_close_to_reference(folded_bias, expected_bias, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_running_mean_close_to_conv_bias(dtype):
    """A conv bias followed by a BN: the running mean tracks the bias, so b - mean cancels. Taken
    first (as the formula has it), the difference is exact and the folded bias keeps float32 accuracy."""
    torch.manual_seed(0)
    weight, bias, bn = make_conv_bn(dtype, gamma=HUGE_GAMMA[dtype] * (1 + torch.rand(K)),
                                    mean_minus_bias=1e-3 * torch.randn(K))
    folded_weight, folded_bias = ops.fold_bn(weight, bias, bn)
    expected_weight, expected_bias = reference_fold(weight, bias, bn)
    assert_close_to_reference(folded_weight, expected_weight, "elementwise")
    assert_close_to_reference(folded_bias, expected_bias, "elementwise")


def test_inputs_left_unchanged_and_no_grad():
    conv, bn = nn.Conv2d(C, K, 3), nn.BatchNorm2d(K).eval()
    before = [t.clone() for t in (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    folded_weight, folded_bias = ops.fold_bn(conv.weight, conv.bias, bn)
    after = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not folded_weight.requires_grad and not folded_bias.requires_grad


class SubclassedBatchNorm2d(nn.BatchNorm2d):
    """A model's own BatchNorm2d subclass: a BatchNorm2d for folding, training mode included."""


@pytest.mark.parametrize("subclass", [False, True], ids=["BatchNorm2d", "subclass"])
def test_refuses_training_mode(subclass):
    weight, bias, bn = make_conv_bn(torch.float32)
    if subclass:
        statistics, bn = bn.state_dict(), SubclassedBatchNorm2d(K)
        bn.load_state_dict(statistics)
        ops.fold_bn(weight, bias, bn.eval())  # folds as its base class does
    with pytest.raises(RuntimeError, match="training mode; call .eval"):
        ops.fold_bn(weight, bias, bn.train())


def test_refuses_batchnorm_without_running_statistics():
    weight, bias, _ = make_conv_bn(torch.float32)
    bn = nn.BatchNorm2d(K, track_running_stats=False).eval()
    with pytest.raises(RuntimeError, match="no running statistics"):
        ops.fold_bn(weight, bias, bn)


def test_refuses_wrong_num_features():
    weight, bias, _ = make_conv_bn(torch.float32)
    with pytest.raises(ValueError, match=f"BatchNorm has {K - 1} features, the convolution {K} output channels"):
        ops.fold_bn(weight, bias, nn.BatchNorm2d(K - 1).eval())


def test_refuses_wrong_conv_bias_length():
    weight, _, bn = make_conv_bn(torch.float32)
    with pytest.raises(ValueError, match=rf"conv bias must have shape \({K},\), got \({K + 1},\)"):
        ops.fold_bn(weight, torch.zeros(K + 1), bn)


def test_refuses_other_modules():
    weight, bias, _ = make_conv_bn(torch.float32)
    with pytest.raises(TypeError, match="expected a BatchNorm2d or FrozenBatchNorm2d, got BatchNorm1d"):
        ops.fold_bn(weight, bias, nn.BatchNorm1d(K).eval())


def test_folds_torchvisions_frozen_batchnorm():
    """FrozenBatchNorm2d (detection backbones' BatchNorm) folds as an eval-mode BatchNorm2d does,
    whatever its module's training flag: it has no training mode."""
    torch.manual_seed(0)
    weight, bias, bn = make_conv_bn(torch.float32)
    frozen = FrozenBatchNorm2d(K, eps=bn.eps)
    frozen.load_state_dict({name: bn.state_dict()[name] for name in frozen.state_dict()})
    x = torch.randn(2, C, 6, 7)
    for module in (frozen.eval(), copy.deepcopy(frozen).train()):
        folded_weight, folded_bias = ops.fold_bn(weight, bias, module)
        out = F.conv2d(x, folded_weight, folded_bias, padding=1)
        assert_close_to_reference(out, reference_conv_bn(x, weight, bias, module), "conv")


def test_refuses_a_weight_it_would_broadcast_or_truncate():
    """A weight of the wrong rank would broadcast against the per-channel scale; an integer or
    complex weight, or an integer dtype, would truncate the folded values."""
    conv, bn = nn.Conv2d(C, K, 3), nn.BatchNorm2d(K).eval()
    with pytest.raises(ValueError, match=r"fold_bn: expected a 4-D \(K, C, R, S\) conv weight, got shape \(8, 5\)"):
        ops.fold_bn(conv.weight[:, :, 0, 0], None, bn)
    with pytest.raises(TypeError, match="fold_bn: conv_weight must be a floating tensor, got torch.int32"):
        ops.fold_bn(conv.weight.detach().round().int(), None, bn)
    with pytest.raises(TypeError, match="fold_bn: conv_weight must be a floating tensor, got torch.complex64"):
        ops.fold_bn(conv.weight.detach().cfloat(), None, bn)
    with pytest.raises(TypeError, match="fold_bn: conv_weight must be a floating tensor, got NoneType"):
        ops.fold_bn(None, None, bn)
    with pytest.raises(TypeError, match="fold_bn: conv_bias must be a floating tensor, got torch.int64"):
        ops.fold_bn(conv.weight, torch.zeros(K, dtype=torch.int64), bn)
    with pytest.raises(TypeError, match="fold_bn: dtype must be a floating dtype"):
        ops.fold_bn(conv.weight, None, bn, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="fold_bn: all tensors must be on one device, got conv_weight on meta"):
        ops.fold_bn(conv.weight.to("meta"), None, bn)
