"""cnnfast.nn: each fused module against the unfused PyTorch modules it replaces (run in float64
as the reference), with the torch backend and Triton (under the interpreter on a CPU).

Also home of `randomize_bn`, which tests/test_optimize.py and bench/bench_models.py share."""
import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.googlenet import Inception as TvInception
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from cnnfast import ops
from cnnfast.backends import resolve_backend
from cnnfast.precision import tf32_allowed
from cnnfast.models import preact
from cnnfast.nn import (
    BasicBlock, BatchNormReLU, Bottleneck, ConvBNReLU, GlobalAvgPoolLinear, Inception, LinearReLU, PreActBasicBlock,
)
from cnnfast.testing import assert_close_to_reference
from tests.test_global_avg_pool import CPU_BACKENDS, TRITON_GPU

BACKENDS = CPU_BACKENDS + [TRITON_GPU]


@pytest.fixture(autouse=True)
def ops_run_on_the_backend_asked_for(request, monkeypatch):
    """In a test given a backend, every op the fused modules call runs on that backend: a module
    that dropped its backend would run the default (torch on a CPU), whose numbers pass too."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is None:
        yield
        return
    resolved = []

    def recording(op, x, requested, *layer):
        chosen = resolve_backend(op, x, requested, *layer)
        resolved.append((op, chosen))
        return chosen

    monkeypatch.setattr(ops, "resolve_backend", recording)
    yield
    assert resolved and all(chosen == backend for _, chosen in resolved), f"asked for {backend}, ran {resolved}"


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode, with every BatchNorm's running statistics and affine parameters drawn at
    random (after initialisation they are 0, 1, 1, 0, and folding them would change nothing). gamma
    stays below 1: with gamma around 1 the residual stream of ResNet-152 grows to 1e8."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda t, low, high: t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                draw(bn.running_mean, -0.5, 0.5)
                draw(bn.running_var, 0.5, 2.0)
                if getattr(bn, "affine", True):  # FrozenBatchNorm2d always has gamma and beta
                    draw(bn.weight, 0.25, 0.75)
                    draw(bn.bias, -0.5, 0.5)
    return model.eval()


def reference(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The unfused module's output in float64 on the CPU."""
    return copy.deepcopy(module).double()(*(x.double().cpu() for x in inputs))


def conv_kind(device: str) -> str:
    """The tolerance row: a float32 convolution on a GPU runs as TF32 when cuDNN's flag allows it."""
    return "tf32" if device == "cuda" and tf32_allowed("conv") else "conv"


def image(n, c, h, w, device="cpu") -> torch.Tensor:
    return torch.randn(n, c, h, w, device=device)


# ---------------------------------------------------------------- ConvBNReLU


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_bn", [False, True], ids=["no-bn", "bn"])
@pytest.mark.parametrize("with_relu", [False, True], ids=["no-relu", "relu"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_conv_bn_relu_matches_unfused(backend, device, with_relu, with_bn, conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=conv_bias)
    bn = randomize_bn(nn.BatchNorm2d(6)) if with_bn else None
    relu = nn.ReLU() if with_relu else None
    fused = ConvBNReLU.from_modules(conv, bn, relu, backend=backend).to(device)
    assert (fused.bn_folded, fused.relu) == (with_bn, with_relu)
    assert fused.weight.is_contiguous(memory_format=torch.channels_last)
    assert fused.bias.dtype == torch.float32 and not fused.weight.requires_grad and not fused.bias.requires_grad
    x = image(2, 5, 9, 7, device)
    out = fused(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    unfused = nn.Sequential(conv, *[m for m in (bn, relu) if m is not None])
    assert_close_to_reference(out, reference(unfused, x), conv_kind(device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_conv_bn_relu_with_residual(backend, device):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), randomize_bn(nn.BatchNorm2d(6))
    fused = ConvBNReLU.from_modules(conv, bn, True, backend=backend).to(device)
    x, residual = image(2, 4, 5, 7, device), image(2, 6, 5, 7, device)
    expected = torch.relu(reference(nn.Sequential(conv, bn), x) + residual.double().cpu())
    assert_close_to_reference(fused(x, residual=residual), expected, conv_kind(device))


def test_conv_bn_relu_bfloat16_weights_float32_bias():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(16))
    fused = ConvBNReLU.from_modules(conv, bn, True, dtype=torch.bfloat16)
    assert fused.weight.dtype == torch.bfloat16 and fused.bias.dtype == torch.float32
    x = image(1, 8, 6, 6).to(torch.bfloat16)
    out = fused(x)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, reference(nn.Sequential(conv, bn, nn.ReLU()), x), "conv")


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_conv_folds_into_float32_weights_rounded_once(weight_dtype):
    """The folded weight is the half weight times BN's scale, rounded once to the dtype asked for:
    not rounded to the half dtype first."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=False).to(weight_dtype), randomize_bn(nn.BatchNorm2d(16))
    fused = ConvBNReLU.from_modules(conv, bn, True, dtype=torch.float32)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact = conv.weight.double() * scale.view(-1, 1, 1, 1)
    assert fused.weight.dtype == torch.float32
    torch.testing.assert_close(fused.weight.double(), exact, rtol=1e-6, atol=0)


def test_conv_bn_relu_refuses_what_it_cannot_fold():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(RuntimeError, match="training mode"):
        ConvBNReLU.from_modules(conv, nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="running statistics"):
        ConvBNReLU.from_modules(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(NotImplementedError, match="groups=1"):
        ConvBNReLU.from_modules(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="zero padding"):
        ConvBNReLU.from_modules(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


# ---------------------------------------------------------------- LinearReLU and GlobalAvgPoolLinear


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_relu", [False, True], ids=["no-relu", "relu"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_linear_relu_matches_unfused(backend, device, with_relu, bias):
    torch.manual_seed(0)
    linear = nn.Linear(37, 19, bias=bias)
    fused = LinearReLU.from_modules(linear, nn.ReLU() if with_relu else None, backend=backend).to(device)
    assert fused.relu == with_relu and fused.bias.dtype == torch.float32
    unfused = nn.Sequential(linear, nn.ReLU()) if with_relu else linear
    x = torch.randn(3, 37, device=device)
    assert_close_to_reference(fused(x), reference(unfused, x), conv_kind(device))


def test_linear_relu_takes_leading_dimensions_like_nn_linear():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    fused = LinearReLU.from_modules(linear, True)
    for shape in [(2, 3, 6), (6,)]:
        x = torch.randn(shape)
        assert_close_to_reference(fused(x), torch.relu(reference(linear, x)), "conv")
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        fused(torch.randn(3, 4))


# name: (build with keyword arguments, whether it takes relu=)
FROM_MODULES = {
    "conv": (lambda **kw: ConvBNReLU.from_modules(nn.Conv2d(4, 4, 1), None, **kw), True),
    "conv-bn": (lambda **kw: ConvBNReLU.from_modules(nn.Conv2d(4, 4, 1), randomize_bn(nn.BatchNorm2d(4)).eval(), **kw),
                True),
    "linear": (lambda **kw: LinearReLU.from_modules(nn.Linear(4, 3), **kw), True),
    "gap-linear": (lambda **kw: GlobalAvgPoolLinear.from_modules(nn.Linear(4, 3), **kw), False),
}


@pytest.mark.parametrize("name", FROM_MODULES)
def test_from_modules_refuses_a_dtype_or_relu_it_cannot_take(name):
    """An int8 dtype would truncate the weights to zeros, a string is no dtype; a relu of 'no' is
    truthy, and would add a ReLU."""
    build, takes_relu = FROM_MODULES[name]
    for dtype in (torch.int8, torch.complex64, torch.float64, "float16"):
        with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16, got "):
            build(dtype=dtype)
    if takes_relu:
        with pytest.raises(TypeError, match="relu must be an activation module, a bool or None, got 'no'"):
            build(relu="no")
        assert build(relu=True).relu and not build(relu=None).relu
    assert build(dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_linear_relu_refuses_another_activation():
    with pytest.raises(NotImplementedError, match="the activation is SiLU, not ReLU"):
        LinearReLU.from_modules(nn.Linear(4, 3), nn.SiLU())


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_global_avg_pool_linear_matches_unfused(backend, device):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10)
    fused = GlobalAvgPoolLinear.from_modules(linear, backend=backend).to(device)
    unfused = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    x = image(3, 24, 5, 4, device)
    assert_close_to_reference(fused(x), reference(unfused, x), conv_kind(device))


# ---------------------------------------------------------------- residual blocks


def downsample(in_channels, out_channels, stride):
    """torchvision's projection shortcut: 1x1 conv and BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


# (block, input shape): identity shortcut, then a projection that halves the map and widens it.
RESNET_BLOCKS = {
    "basic": (lambda: TvBasicBlock(8, 8), (2, 8, 6, 5)),
    "basic-downsample": (lambda: TvBasicBlock(8, 16, 2, downsample(8, 16, 2)), (2, 8, 7, 6)),
    "bottleneck": (lambda: TvBottleneck(16, 4), (2, 16, 5, 6)),
    "bottleneck-downsample": (lambda: TvBottleneck(8, 4, 2, downsample(8, 16, 2)), (2, 8, 7, 6)),
}


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kind", list(RESNET_BLOCKS))
def test_resnet_block_matches_torchvision(kind, backend, device):
    torch.manual_seed(0)
    build, shape = RESNET_BLOCKS[kind]
    block = randomize_bn(build())
    fused_type = Bottleneck if "bottleneck" in kind else BasicBlock
    fused = fused_type.from_torchvision(block, backend=backend).to(device)
    assert (fused.downsample is not None) == ("downsample" in kind)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = image(*shape, device=device)
    out = fused(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out, reference(block, x), conv_kind(device))


def test_resnet_block_refuses_training_mode():
    with pytest.raises(RuntimeError, match="training mode"):
        BasicBlock.from_torchvision(TvBasicBlock(4, 4))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("stride, in_channels, preactivate", [(1, 8, True), (2, 6, True), (1, 8, False)],
                         ids=["identity", "downsample", "first-block"])
def test_preact_block_matches_unfused(stride, in_channels, preactivate, backend, device):
    torch.manual_seed(0)
    block = randomize_bn(preact.PreActBasicBlock(in_channels, 8, stride, preactivate=preactivate))
    fused = PreActBasicBlock.from_module(block, backend=backend).to(device)
    assert (fused.downsample is not None) == (stride == 2)
    assert isinstance(fused.pre, BatchNormReLU if preactivate else nn.Identity)
    assert fused.conv1.bn_folded and not fused.conv2.relu
    x = image(2, in_channels, 7, 6, device)
    assert_close_to_reference(fused(x), reference(block, x), conv_kind(device))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_batchnorm_relu_matches_unfused(affine):
    bn = randomize_bn(nn.BatchNorm2d(6, affine=affine))
    fused = BatchNormReLU(bn)
    x = image(2, 6, 4, 3).contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(fused(x), reference(nn.Sequential(bn, nn.ReLU()), x), "elementwise")
    with pytest.raises(RuntimeError, match="training mode"):
        BatchNormReLU(nn.BatchNorm2d(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_batchnorm_relu_keeps_a_half_inputs_dtype_with_float32_statistics(dtype):
    """As nn.BatchNorm2d does: half activations, float32 statistics, a half output (computed in
    float32 and rounded once)."""
    bn = randomize_bn(nn.BatchNorm2d(6))
    x = image(2, 6, 4, 3).to(dtype)
    out = BatchNormReLU(bn)(x)
    assert out.dtype == dtype
    assert_close_to_reference(out, reference(nn.Sequential(bn, nn.ReLU()), x), "elementwise")
    with pytest.raises(TypeError, match="input dtype torch.int64 is not a floating dtype"):
        BatchNormReLU(bn)(torch.ones(1, 6, 2, 2, dtype=torch.int64))


FUSED_MODULES = {
    "ConvBNReLU": (lambda: ConvBNReLU.from_modules(nn.Conv2d(3, 4, 1), randomize_bn(nn.BatchNorm2d(4))), (1, 3, 2, 2)),
    "LinearReLU": (lambda: LinearReLU.from_modules(nn.Linear(3, 4), True), (1, 3)),
    "GlobalAvgPoolLinear": (lambda: GlobalAvgPoolLinear.from_modules(nn.Linear(3, 4)), (1, 3, 2, 2)),
    "BatchNormReLU": (lambda: BatchNormReLU(randomize_bn(nn.BatchNorm2d(3))), (1, 3, 2, 2)),
}


@pytest.mark.parametrize("kind", list(FUSED_MODULES))
def test_a_fused_module_is_built_for_inference_and_refuses_training_mode(kind):
    build, shape = FUSED_MODULES[kind]
    fused = build()
    assert not fused.training
    fused(torch.randn(shape))
    with pytest.raises(RuntimeError, match=f"{kind}: in training mode, but fused modules are for inference"):
        fused.train()(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (4, 6), (2, 7, 3, 3)], ids=["one-channel", "2-D", "seven-channels"])
def test_batchnorm_relu_refuses_an_input_it_would_broadcast(shape):
    fused = BatchNormReLU(randomize_bn(nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match=rf"BatchNormReLU expects \(N, 6, H, W\) input, got shape {re.escape(str(shape))}"):
        fused(torch.randn(shape))


# ---------------------------------------------------------------- Inception


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_inception_writes_each_branch_into_its_channel_slice(backend, device):
    torch.manual_seed(0)
    # in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection: widths 4 + 5 + 3 + 6 = 18.
    module = randomize_bn(TvInception(7, 4, 3, 5, 2, 3, 6))
    fused = Inception.from_torchvision(module, backend=backend).to(device)
    assert fused.channel_ranges == [(0, 4), (4, 9), (9, 12), (12, 18)]
    x = image(2, 7, 6, 5, device)
    out = fused(x)
    assert out.shape == (2, 18, 6, 5) and out.is_contiguous(memory_format=torch.channels_last)
    branches = [module.branch1, module.branch2, module.branch3, module.branch4]
    for (start, stop), branch in zip(fused.channel_ranges, branches):
        assert_close_to_reference(out[:, start:stop], reference(branch, x), conv_kind(device))
    assert_close_to_reference(out, reference(module, x), conv_kind(device))


def test_inception_refuses_an_input_that_is_not_4d():
    fused = Inception.from_torchvision(randomize_bn(TvInception(7, 4, 3, 5, 2, 3, 6)))
    with pytest.raises(ValueError, match=r"Inception expects a 4-D \(N, C, H, W\) input, got shape \(7, 6, 5\)"):
        fused(torch.randn(7, 6, 5))


# ---------------------------------------------------------------- the public constructors' checks


class SqueezeExcitedBlock(TvBasicBlock):
    """A BasicBlock whose own forward computes something else: its fused form would drop the scale."""

    def forward(self, x):
        return super().forward(x) * 0.5


def tv_basic_block():
    return randomize_bn(TvBasicBlock(4, 4))


# name: (constructor, a module it takes, a module of another type, what it expects)
CONSTRUCTORS = {
    "BasicBlock": (BasicBlock.from_torchvision, tv_basic_block, lambda: randomize_bn(TvBottleneck(16, 4)),
                   "torchvision's BasicBlock"),
    "Bottleneck": (Bottleneck.from_torchvision, lambda: randomize_bn(TvBottleneck(16, 4)), tv_basic_block,
                   "torchvision's Bottleneck"),
    "PreActBasicBlock": (PreActBasicBlock.from_module, lambda: randomize_bn(preact.PreActBasicBlock(4, 4)),
                         tv_basic_block, "cnnfast.models' PreActBasicBlock"),
    "Inception": (Inception.from_torchvision, lambda: randomize_bn(TvInception(7, 4, 3, 5, 2, 3, 6)), tv_basic_block,
                  "torchvision's Inception"),
    "LinearReLU": (LinearReLU.from_modules, lambda: nn.Linear(4, 3), lambda: nn.Conv2d(4, 3, 1), "an nn.Linear"),
    "GlobalAvgPoolLinear": (GlobalAvgPoolLinear.from_modules, lambda: nn.Linear(4, 3), lambda: nn.Conv2d(4, 3, 1),
                            "an nn.Linear"),
}


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_a_constructor_refuses_a_module_its_fused_form_would_not_compute_as(name):
    """A module of another type (a Bottleneck read as a BasicBlock would lose conv3), one whose own
    forward computes otherwise, and one with a hook are refused by name, not fused into a module
    that computes something else or drops the hook."""
    construct, build, other, expected = CONSTRUCTORS[name]
    construct(build())  # the module it is for is taken
    with pytest.raises(TypeError, match=f"^where: expected {re.escape(expected)}, got {type(other()).__name__}$"):
        construct(other(), name="where")

    overridden = build()
    overridden.forward = lambda *args: 0
    with pytest.raises(NotImplementedError, match=rf"^where: {type(overridden).__name__} overrides how "
                                                  rf"(nn\.)?{type(overridden).__name__} computes \(forward, on the "
                                                  r"instance\); it is not fused$"):
        construct(overridden, name="where")

    hooked = build()
    hooked.register_forward_hook(lambda *args: None)
    with pytest.raises(NotImplementedError, match=f"^where: its {type(hooked).__name__} has forward hooks"):
        construct(hooked, name="where")


def test_a_block_subclass_with_its_own_forward_is_named_with_its_class():
    with pytest.raises(NotImplementedError, match=r"SqueezeExcitedBlock overrides how BasicBlock computes \(forward, "
                                                  r"in SqueezeExcitedBlock\)"):
        BasicBlock.from_torchvision(randomize_bn(SqueezeExcitedBlock(4, 4)))


def test_a_conv_whose_geometry_is_numpy_ints_or_one_tuples_is_fused_as_pairs_of_ints():
    """nn.Conv2d takes padding=k // 2 of a numpy config array and stride=(2,); the ops take ints."""
    conv = nn.Conv2d(3, 4, np.int64(3), stride=(2,), padding=np.int64(3) // 2, dilation=(1,))
    bn = randomize_bn(nn.BatchNorm2d(4))
    fused = ConvBNReLU.from_modules(conv, bn, True)
    assert (fused.kernel_size, fused.stride, fused.padding, fused.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert all(type(v) is int for v in fused.padding + fused.stride)
    x = image(2, 3, 7, 6)
    assert_close_to_reference(fused(x), reference(nn.Sequential(conv, bn, nn.ReLU()), x), "conv")


@pytest.mark.parametrize("build", [lambda **kw: ConvBNReLU.from_modules(nn.Conv2d(3, 4, 1).double(), **kw),
                                   lambda **kw: LinearReLU.from_modules(nn.Linear(3, 4).double(), **kw),
                                   lambda **kw: GlobalAvgPoolLinear.from_modules(nn.Linear(3, 4).double(), **kw)],
                         ids=["conv", "linear", "gap-linear"])
def test_a_float64_module_needs_a_dtype(build):
    """Without dtype= the fused module would hold float64 weights, which no op computes in."""
    with pytest.raises(TypeError, match=r"the weight is torch.float64, which the fused ops do not compute in: pass "
                                        r"dtype="):
        build()
    assert build(dtype=torch.float32).weight.dtype == torch.float32


@pytest.mark.parametrize("relu", [None, False])
def test_batchnorm_relu_refuses_to_be_built_without_a_relu(relu):
    with pytest.raises(TypeError, match=f"BatchNormReLU always applies a ReLU; relu must be an nn.ReLU or True, got "
                                        f"{relu}"):
        BatchNormReLU.from_modules(randomize_bn(nn.BatchNorm2d(3)), relu)
    assert BatchNormReLU.from_modules(randomize_bn(nn.BatchNorm2d(3)), True).channels == 3
