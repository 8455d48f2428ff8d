"""cnnfast.optimize: every architecture against the original model (torch backend at the lecture's
input size, Triton under the interpreter on small inputs, bfloat16), the fusion report, what
cnnfast.analysis counts before and after, models with parts optimize does not know, the bad-input
contract, torch.compile and CUDA-graph capture."""
import collections
import copy
import functools
import io
import threading
import types

import pytest
import torch
import triton
from torch import nn
from torchvision import models as tv
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import ResNet as TvResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import cnnfast
from cnnfast import models
from cnnfast.analysis import analyze, analyze_arch
from cnnfast.convert import ModelInput
from cnnfast.nn import FX_LEAF_MODULES, BatchNormReLU, ConvBNReLU, GlobalAvgPoolLinear, LinearReLU
from cnnfast.testing import tolerance
from cnnfast.triton_kernels import conv2d as triton_conv2d
from tests.test_global_avg_pool import INTERPRETER_ONLY
from tests.test_nn import randomize_bn

NAMES = [*models.ARCHITECTURES, "preact_resnet18", "preact_resnet34"]
FUSED_LEAVES = (ConvBNReLU, LinearReLU, GlobalAvgPoolLinear)


def build(name: str, **kwargs) -> nn.Module:
    """A plain model with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    return randomize_bn(getattr(models, name)(**kwargs))


def build_meta(name: str, **kwargs) -> nn.Module:
    """A model without memory, for the structure of the result, the report and the analysis."""
    with torch.device("meta"):
        return getattr(models, name)(**kwargs).eval()


def input_size(name: str) -> int:
    return models.DEFAULT_INPUT_SIZE.get(name, 224)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The tolerance table's row for actual's dtype (conv for float32), with atol relative to the
    largest output: the table's atol is for values of order one, while these logits run from 1e-2
    (AlexNet and VGG without BatchNorm, as initialised) to 2, and each layer's rounding error scales
    with its values. expected is the float64 reference (run_both)."""
    rtol, atol = tolerance("conv", actual.dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


def run_both(original: nn.Module, fused: nn.Module, x: torch.Tensor):
    """fused(x) and the reference: the original model run in float64 (on a copy)."""
    reference = copy.deepcopy(original).double()
    with torch.no_grad():
        return fused(x), reference(x.double())


def assert_fully_fused(model: nn.Module) -> None:
    """No BatchNorm and no ReLU module is left: all of them were folded or fused into an epilogue."""
    leftovers = [name for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.ReLU))]
    assert not leftovers, f"unfused BatchNorm2d/ReLU: {leftovers[:5]}"


# ---------------------------------------------------------------- every architecture against the original


@pytest.mark.parametrize("name", NAMES)
def test_matches_original_with_torch_backend(name):
    original = build(name)
    fused = cnnfast.optimize(original)
    assert_fully_fused(fused)
    x = torch.randn(1, 3, input_size(name), input_size(name))
    out, expected = run_both(original, fused, x)
    assert out.shape == (1, 1000) and out.dtype == torch.float32
    assert_matches(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_fused_builder_returns_a_fused_model(name):
    model = build_meta(name, fused=True)
    assert not model.training and not any(m.training for m in model.modules())
    assert any(isinstance(m, ConvBNReLU) for m in model.modules())
    assert_fully_fused(model)
    assert model.cnnfast_report.fused


def fitted_tile(extent: int, largest: int) -> int:
    """The power-of-two tile side, 16 to largest, that covers extent in the fewest steps."""
    return min(largest, max(16, triton.next_power_of_2(extent)))


@pytest.fixture
def large_interpreter_tiles(monkeypatch):
    """Every conv and linear layer with one tile fitted to it: as many rows (up to 64), output
    channels (up to 512) and reduction elements (up to 512: channels, or all of R x S x C on the flat
    order) as it has. Under the interpreter a small-input model's time is set by its weights: each
    BLOCK_N x BLOCK_K tile of a weight is one interpreted loop iteration, and each numpy operation
    of an iteration costs as the tile's size. With the interpreter's default 32x32x16 tile ResNet-18
    takes 70 s and AlexNet (whose classifier holds 55M weights) 400 s; one 16x512x512 tile for every
    layer took VGG-16 (103M weights in its first FC layer) 50 s, 19 of them on a 64-channel conv
    whose tiles were mostly masked; fitted tiles, about 20 s. The tile does not change what these tests
    check (the wiring of fused models through the Triton kernels); test_conv2d runs every autotune
    config, and test_nn the default one. Counts the calls."""
    launch, calls = triton_conv2d.conv2d_bias_act, []

    def counted(x, weight, bias, residual, out, *args, **kwargs):
        calls.append(weight.shape)
        (n, c, _, _), (k, _, r, s), (_, _, p, q) = x.shape, weight.shape, out.shape
        reduction = c * r * s if triton_conv2d.use_flat_reduction(c) else c
        tile = {"BLOCK_M": fitted_tile(n * p * q, 64), "BLOCK_N": fitted_tile(k, 512),
                "BLOCK_K": fitted_tile(reduction, 512), "GROUP_M": 1}
        config = triton.Config(tile, num_warps=4, num_stages=1)
        return launch(x, weight, bias, residual, out, *args, **kwargs, config=config)

    monkeypatch.setattr(triton_conv2d, "conv2d_bias_act", counted)
    return calls


# (name, input size): the smallest inputs AlexNet and VGG-16 take (test_smallest_inputs), and small
# ones for the rest. 10 classes: the Triton head is then small; the hidden layers stay as they are.
TRITON_CASES = [("resnet18", 32), ("googlenet", 32), ("alexnet", 63), ("vgg16_bn", 32)]


@INTERPRETER_ONLY
@pytest.mark.parametrize("name, size", TRITON_CASES, ids=[name for name, _ in TRITON_CASES])
def test_matches_original_with_triton_backend(name, size, large_interpreter_tiles):
    original = build(name, num_classes=10)
    fused = cnnfast.optimize(original, backend="triton")
    out, expected = run_both(original, fused, torch.randn(1, 3, size, size))
    assert_matches(out, expected)
    # Every fused conv and linear layer ran through the Triton launcher, once.
    assert len(large_interpreter_tiles) == sum(isinstance(m, (ConvBNReLU, LinearReLU)) for m in fused.modules())


def test_smallest_inputs():
    for name, size in [("alexnet", 63), ("vgg16_bn", 32)]:
        analyze_arch(name, size)
        with pytest.raises(ValueError, match="too small"):
            analyze_arch(name, size - 1)


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "resnet18", "preact_resnet18"])
def test_bfloat16(name):
    original = build(name)
    fused = cnnfast.optimize(original, dtype=torch.bfloat16)
    for module in fused.modules():
        if isinstance(module, FUSED_LEAVES):
            assert module.weight.dtype == torch.bfloat16 and module.bias.dtype == torch.float32
        if isinstance(module, BatchNormReLU):  # applied in float32, as the biases are
            assert module.scale.dtype == module.shift.dtype == torch.float32
    # A float32 NCHW input: the model boundary converts it to bfloat16 and channels_last.
    first_conv_inputs = []
    next(module for module in fused.modules() if isinstance(module, ConvBNReLU)).register_forward_pre_hook(
        lambda module, args: first_conv_inputs.append((args[0].dtype, args[0].is_contiguous(
            memory_format=torch.channels_last))))
    out, expected = run_both(original, fused, torch.randn(1, 3, input_size(name), input_size(name)))
    assert out.dtype == torch.bfloat16
    assert first_conv_inputs == [(torch.bfloat16, True)]
    assert_matches(out, expected)


# ---------------------------------------------------------------- the fusion report


# (fused, left alone) per architecture. AlexNet and ZFNet: 5 convs and 3 linear layers fused; 3 max
# pools, the adaptive pool and 2 dropouts left. VGG: 13 or 16 convs and 3 linear layers; 5 max pools,
# the adaptive pool, 2 dropouts. GoogLeNet: 3 stem convs, 9 Inception modules, the head; 4 max pools
# and the dropout. ResNets: the stem, every block, the head; the max pool. Pre-activation ResNets
# also fuse the final BatchNorm + ReLU.
EXPECTED_COUNTS = {
    "alexnet": (8, 6), "zfnet": (8, 6), "vgg16": (16, 8), "vgg19": (19, 8), "vgg16_bn": (16, 8),
    "vgg19_bn": (19, 8), "googlenet": (13, 5), "resnet18": (10, 1), "resnet34": (18, 1), "resnet50": (18, 1),
    "resnet101": (35, 1), "resnet152": (52, 1), "preact_resnet18": (11, 1), "preact_resnet34": (19, 1),
}


@pytest.mark.parametrize("name", NAMES)
def test_fusion_report_counts(name):
    report = cnnfast.optimize(build_meta(name)).cnnfast_report
    assert (len(report.fused), len(report.left_alone)) == EXPECTED_COUNTS[name]
    names = [entry for entry, _ in report.fused + report.left_alone]
    assert len(names) == len(set(names))
    for entry, reason in report.left_alone:
        if "maxpool" in entry or entry.startswith("features."):
            assert reason == "max pooling runs in PyTorch (channels_last)"


def test_fusion_report_says_what_each_layer_became(capsys):
    vgg = cnnfast.optimize(build_meta("vgg16_bn"), verbose=True)
    fused, left_alone = dict(vgg.cnnfast_report.fused), dict(vgg.cnnfast_report.left_alone)
    assert fused["features.0"] == "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"
    assert fused["classifier.3"] == "Linear + ReLU -> LinearReLU"
    assert fused["classifier.6"] == "Linear -> LinearReLU"
    assert left_alone["classifier.2"] == "dropout is the identity in eval mode"
    assert "adaptive average pooling" in left_alone["avgpool"]
    printed = capsys.readouterr().out
    assert printed.startswith("fused 16 modules:") and "left alone 8 modules:" in printed
    assert "  features.6: max pooling runs in PyTorch (channels_last)" in printed
    single = cnnfast.optimize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Dropout()).eval())
    assert str(single.cnnfast_report).splitlines()[::2] == ["fused 1 module:", "left alone 1 module:"]

    resnet = dict(cnnfast.optimize(build_meta("resnet50")).cnnfast_report.fused)
    assert resnet["conv1"] == "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"
    assert resnet["layer3.5"] == "Bottleneck -> fused Bottleneck"
    assert resnet["avgpool"] == "AdaptiveAvgPool2d + Linear -> GlobalAvgPoolLinear"
    googlenet = dict(cnnfast.optimize(build_meta("googlenet")).cnnfast_report.fused)
    assert googlenet["conv2"] == "BasicConv2d -> fused ConvBNReLU"
    assert googlenet["inception4c"] == "Inception -> fused Inception"


def test_repr_is_readable():
    text = repr(cnnfast.optimize(build_meta("resnet18")))
    stem = "(conv1): ConvBNReLU(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bn_folded=True, relu=True)"
    assert stem in text
    assert "bn_folded=True, relu=False" in text  # a downsample: the projection shortcut has no ReLU
    assert "(avgpool): GlobalAvgPoolLinear(in_features=512, out_features=1000, bias=True)" in text
    text = repr(cnnfast.optimize(build_meta("vgg16")))
    assert "ConvBNReLU(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bn_folded=False, relu=True)" in text
    assert "LinearReLU(in_features=25088, out_features=4096, bias=True, relu=True)" in text
    text = repr(cnnfast.optimize(build_meta("resnet18"), backend="triton"))  # a pinned backend is shown
    assert "padding=(3, 3), bn_folded=True, relu=True, backend='triton')" in text
    assert "GlobalAvgPoolLinear(in_features=512, out_features=1000, bias=True, backend='triton')" in text
    assert "LinearReLU(in_features=25088, out_features=4096, bias=True, relu=True, backend='torch')" in repr(
        cnnfast.optimize(build_meta("vgg16"), backend="torch"))


# ---------------------------------------------------------------- what cnnfast.analysis counts


def expected_param_change(model: nn.Module) -> int:
    """Parameters optimize() removes: each BatchNorm's gamma and beta (2K; a pre-activation's
    BatchNormReLU keeps its scale and shift as buffers); every conv becomes a ConvBNReLU, which has a
    bias (the folded shift), so a conv that had none gains K: K fewer for conv(bias=False) -> BN."""
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    new_biases = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None)
    return bn - new_biases


@pytest.mark.parametrize("name", NAMES)
def test_analysis_of_fused_model(name):
    plain_model = build_meta(name)
    plain = analyze(plain_model, input_size(name), batch=2)
    fused = analyze(cnnfast.optimize(plain_model), input_size(name), batch=2)
    assert fused.totals["macs"] == plain.totals["macs"] and fused.totals["flops"] == plain.totals["flops"]
    assert plain.totals["params"] - fused.totals["params"] == expected_param_change(plain_model)
    # The head's global average pool output is no longer materialised (it is fused with fc).
    head_fused = hasattr(plain_model, "fc")
    pooled = [row.activation_bytes for row in plain.layers if row.name == "avgpool"]
    assert plain.totals["activation_bytes"] - fused.totals["activation_bytes"] == (pooled[0] if head_fused else 0)
    if head_fused:
        assert pooled[0] == 2 * plain_model.fc.in_features * 4


# ---------------------------------------------------------------- parts optimize does not know


class CustomNet(nn.Module):
    """A Conv2d -> BatchNorm2d -> ReLU run among layers optimize has no fused form for."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.GELU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 6, 1), nn.ReLU(),
        )
        self.gate = nn.Conv2d(6, 6, 1)  # outside a Sequential: stays a Conv2d

    def forward(self, x):
        y = self.body(x)
        return y * torch.sigmoid(self.gate(y))


class TokenMLP(nn.Module):
    """Linear -> ReLU over (N, T, C) tokens, inside a Sequential."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))

    def forward(self, x):
        return self.mlp(x.flatten(2).transpose(1, 2))


def resnet18_with_new_head():
    model = build("resnet18")
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10))
    return model.eval()


def resnet18_with(**kwargs) -> nn.Module:
    """A small torchvision ResNet-18 (10 classes), built with kwargs, its norms' statistics random."""
    torch.manual_seed(0)
    return randomize_bn(tv.resnet18(num_classes=10, **kwargs))


def resnet18_with_a_2x2_pool_head():
    """Pooled to 2x2, then an fc over the 4 x 512 features: no global pool for the fused head."""
    model = resnet18_with()
    model.avgpool, model.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(4 * 512, 10)
    return model.eval()


def resnet18_with_other_activations():
    model = resnet18_with()
    model.relu = nn.LeakyReLU(0.2)
    for block in [*model.layer1, *model.layer2, *model.layer3, *model.layer4]:
        block.relu = nn.SiLU()
    return model.eval()


class SqueezeExciteBlock(TvBasicBlock):
    """A BasicBlock subclass with its own forward (a channel gate before the sum): not a BasicBlock to fuse."""

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y * torch.sigmoid(y.mean((2, 3), keepdim=True)) + shortcut)


class ConvSkip(nn.Sequential):
    """A Sequential subclass whose forward also uses the conv's output before the BatchNorm."""

    def forward(self, x):
        y = self[0](x)
        return self[2](self[1](y)) + y


def resnet18_with_average_pool_shortcut():
    """ResNet-D's shortcut: average pooling, then the 1x1 conv at stride 1."""
    model = resnet18_with()
    block = model.layer2[0]
    conv, bn = block.downsample
    conv.stride = (1, 1)
    block.downsample = nn.Sequential(nn.AvgPool2d(2), conv, bn)
    return model.eval()


def resnet18_with_reflect_padded_stem():
    model = resnet18_with()
    model.conv1.padding_mode = "reflect"
    return model


def hooked_batchnorm():
    """Conv -> BN -> ReLU whose BN output a forward hook keeps (a feature extractor's way)."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True)))
    model[1].register_forward_hook(lambda module, args, output: setattr(module, "kept", output.clone()))
    return model


def legacy_spectral_norm():
    """torch.nn.utils.spectral_norm: a forward pre-hook recomputes the conv's weight."""
    torch.manual_seed(0)
    conv = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3, padding=1))
    return randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))


def hooked_dropout():
    """GoogLeNet's head runs avgpool -> flatten -> dropout -> fc: a hook on the dropout sees the pooled features."""
    model = build("googlenet", num_classes=10)
    model.dropout.register_forward_hook(lambda module, args, output: None)
    return model


def resnet18_with_a_hooked_block():
    model = resnet18_with()
    model.layer1[0].register_forward_hook(lambda module, args, output: None)
    return model.eval()


GLOBAL_POOL_LEFT_ALONE = ("adaptive average pooling runs in PyTorch (only a ResNet's or GoogLeNet's global pool "
                          "straight into its single nn.Linear fc fuses with it)")


def googlenet_with_softsign_for_dropout():
    """GoogLeNet's forward applies its dropout slot to the pooled features: a module there that
    computes something keeps the head unfused (a fused head would apply it to the logits)."""
    model = build("googlenet", num_classes=10)
    model.dropout = nn.Softsign()
    return model.eval()


class MaxOverMap(nn.AdaptiveAvgPool2d):
    """An AdaptiveAvgPool2d subclass that takes the maximum instead: not a global average pool."""

    def forward(self, x):
        return torch.amax(x, (2, 3), keepdim=True)


def resnet18_with_max_pool_subclass():
    model = resnet18_with()
    model.avgpool = MaxOverMap(1)
    return model.eval()


def one_block_twice():
    """nn.Sequential(block, block): one module in two places, both fused, into one fused module."""
    torch.manual_seed(0)
    block = TvBasicBlock(8, 8)
    return randomize_bn(nn.Sequential(block, block))


def doubled_forward(module, x):
    """A forward set on one instance (module.forward = ...): twice what its class computes."""
    return 2 * type(module).forward(module, x)


def conv_with_its_own_forward():
    """Conv -> BN -> ReLU whose conv instance has its forward replaced: not a Conv2d to fuse."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    model[0].forward = types.MethodType(doubled_forward, model[0])
    return model


def resnet18_with_a_block_forward_replaced():
    model = resnet18_with()
    model.layer1[0].forward = types.MethodType(doubled_forward, model.layer1[0])
    return model.eval()


def with_forward_doubled(build_model, path: str):
    """build_model() with the forward of the module at path (dotted) replaced on its instance."""
    def make():
        model = build_model()
        module = model.get_submodule(path)
        module.forward = types.MethodType(doubled_forward, module)
        return model.eval()

    return make


def googlenet_with_a_longer_branch(layers: int):
    """GoogLeNet whose inception3a.branch4 (pool, 1x1 conv) has `layers` layers: a 1x1 conv added, or the conv gone."""
    from torchvision.models.googlenet import BasicConv2d as TvBasicConv2d

    def make():
        model = build("googlenet", num_classes=10)
        branch = model.inception3a.branch4
        if layers == 3:
            branch.append(randomize_bn(TvBasicConv2d(32, 32, kernel_size=1)))
        else:
            model.inception3a.branch4 = nn.Sequential(branch[0], randomize_bn(TvBasicConv2d(192, 32, kernel_size=1)))[1:]
        return model.eval()

    return make


class CallingReLU(nn.ReLU):
    """A ReLU that changes how it is called (not its forward): it adds one after the ReLU."""

    def __call__(self, x):
        return super().__call__(x) + 1


def named_sequential():
    layers = collections.OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act=nn.ReLU(), pool=nn.MaxPool2d(2))
    return randomize_bn(nn.Sequential(layers))


# name -> (build, input shape, a report entry: (name, what it became) or (name, why it was left alone)).
UNKNOWN_PARTS = {
    "custom": (lambda: randomize_bn(CustomNet()), (2, 3, 6, 5), [
        ("fused", "body.0", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"),
        ("fused", "body.6", "Conv2d + ReLU -> ConvBNReLU"),
        ("left_alone", "body.3", "GELU has no fused form; it runs as it is"),
        ("left_alone", "body.4", "Upsample has no fused form; it runs as it is"),
        ("left_alone", "body.5", "only groups=1 convolutions with numeric zero padding are fused"),
        ("left_alone", "gate", "a Conv2d outside an nn.Sequential run or a known block is not fused"),
    ]),
    "token-mlp": (lambda: TokenMLP().eval(), (2, 12, 3, 2), [
        ("fused", "mlp.0", "Linear + ReLU -> LinearReLU"),
        ("left_alone", "mlp.2", "LayerNorm has no fused form; it runs as it is"),
    ]),
    "resnet18-new-head": (resnet18_with_new_head, (1, 3, 64, 64), [
        ("fused", "layer4.1", "BasicBlock -> fused BasicBlock"),
        ("fused", "fc.1", "Linear -> LinearReLU"),
        ("left_alone", "avgpool", GLOBAL_POOL_LEFT_ALONE),
    ]),
    "googlenet-softsign-for-dropout": (googlenet_with_softsign_for_dropout, (1, 3, 64, 64), [
        ("left_alone", "avgpool", GLOBAL_POOL_LEFT_ALONE),
        ("fused", "inception5b", "Inception -> fused Inception"),
    ]),
    "resnet18-pool-subclass": (resnet18_with_max_pool_subclass, (1, 3, 64, 64), [
        ("left_alone", "avgpool", "MaxOverMap has no fused form; it runs as it is"),
        ("left_alone", "fc", "a Linear fuses inside an nn.Sequential run or as a ResNet's or GoogLeNet's head only"),
    ]),
    "one-block-twice": (one_block_twice, (2, 8, 6, 5), [
        ("fused", "0", "BasicBlock -> fused BasicBlock"),
        ("fused", "1", "BasicBlock -> fused BasicBlock (the same module as 0)"),
    ]),
    "resnext50": (lambda: randomize_bn(tv.resnext50_32x4d(num_classes=10)), (1, 3, 64, 64), [
        ("fused", "conv1", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"),
        ("left_alone", "layer2.0", "layer2.0.conv2: only groups=1 convolutions with numeric zero padding are fused"),
    ]),
    "resnet18-other-activations": (resnet18_with_other_activations, (1, 3, 64, 64), [
        ("left_alone", "conv1", "conv1: the activation is LeakyReLU, not ReLU; only ReLU is fused"),
        ("left_alone", "layer1.0", "layer1.0.conv1: the activation is SiLU, not ReLU; only ReLU is fused"),
        ("fused", "avgpool", "AdaptiveAvgPool2d + Linear -> GlobalAvgPoolLinear"),
    ]),
    "squeeze-excite-subclass": (lambda: randomize_bn(TvResNet(SqueezeExciteBlock, [1, 1, 1, 1], num_classes=10)),
                                (1, 3, 64, 64), [
        ("fused", "conv1", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"),
        ("left_alone", "layer1.0.conv1", "a Conv2d outside an nn.Sequential run or a known block is not fused"),
    ]),
    "sequential-subclass": (lambda: randomize_bn(nn.Sequential(ConvSkip(nn.Conv2d(3, 3, 3, padding=1),
                                                                        nn.BatchNorm2d(3), nn.ReLU()))),
                            (2, 3, 6, 5), [
        ("left_alone", "0.0", "a Conv2d outside an nn.Sequential run or a known block is not fused"),
    ]),
    "frozen-batchnorm": (lambda: resnet18_with(norm_layer=FrozenBatchNorm2d), (1, 3, 64, 64), [
        ("fused", "conv1", "Conv2d + FrozenBatchNorm2d + ReLU -> ConvBNReLU"),
        ("fused", "layer2.0", "BasicBlock -> fused BasicBlock"),
    ]),
    "group-norm": (lambda: resnet18_with(norm_layer=functools.partial(nn.GroupNorm, 4)), (1, 3, 64, 64), [
        ("left_alone", "conv1",
         "conv1: GroupNorm is not a BatchNorm2d; only BatchNorm2d and FrozenBatchNorm2d are folded"),
        ("left_alone", "layer1.0",
         "layer1.0.conv1: GroupNorm is not a BatchNorm2d; only BatchNorm2d and FrozenBatchNorm2d are folded"),
    ]),
    "average-pool-shortcut": (resnet18_with_average_pool_shortcut, (1, 3, 64, 64), [
        ("left_alone", "layer2.0", "layer2.0.downsample: only a Sequential(Conv2d, BatchNorm2d) shortcut is fused"),
        ("fused", "layer2.1", "BasicBlock -> fused BasicBlock"),
    ]),
    "reflect-padded-stem": (resnet18_with_reflect_padded_stem, (1, 3, 64, 64), [
        ("left_alone", "conv1", "conv1: only groups=1 convolutions with numeric zero padding are fused"),
        ("fused", "layer1.0", "BasicBlock -> fused BasicBlock"),
    ]),
    "named-sequential": (named_sequential, (2, 3, 6, 6), [
        ("fused", "conv", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU"),
    ]),
    "hooked-batchnorm": (hooked_batchnorm, (2, 3, 6, 6), [
        ("left_alone", "0", "0: its BatchNorm2d has forward hooks, which a fused module would not run"),
    ]),
    "legacy-spectral-norm": (legacy_spectral_norm, (2, 3, 6, 6), [
        ("left_alone", "0", "0: its Conv2d has forward pre-hooks, which a fused module would not run"),
    ]),
    "hooked-dropout": (lambda: hooked_dropout(), (1, 3, 64, 64), [
        ("left_alone", "avgpool", "avgpool: its Dropout has forward hooks, which a fused module would not run"),
    ]),
    "hooked-block": (resnet18_with_a_hooked_block, (1, 3, 64, 64), [
        ("left_alone", "layer1.0", "layer1.0: its BasicBlock has forward hooks, which a fused module would not run"),
        ("fused", "layer1.1", "BasicBlock -> fused BasicBlock"),
    ]),
    "conv-forward-on-the-instance": (conv_with_its_own_forward, (2, 3, 6, 6), [
        ("left_alone", "0", "Conv2d overrides how nn.Conv2d computes (forward, on the instance); it is not fused"),
    ]),
    "block-forward-on-the-instance": (resnet18_with_a_block_forward_replaced, (1, 3, 64, 64), [
        ("left_alone", "layer1.0.conv1", "a Conv2d outside an nn.Sequential run or a known block is not fused"),
        ("fused", "layer1.1", "BasicBlock -> fused BasicBlock"),
    ]),
    "fc-forward-on-the-instance": (with_forward_doubled(resnet18_with, "fc"), (1, 3, 64, 64), [
        ("left_alone", "avgpool", GLOBAL_POOL_LEFT_ALONE),
    ]),
    "inception-branch-forward-on-the-instance": (
        with_forward_doubled(lambda: build("googlenet", num_classes=10), "inception3a.branch2"), (1, 3, 64, 64), [
            ("left_alone", "inception3a", "inception3a: a branch computes otherwise than its nn.Sequential's layers "
                                          "in turn"),
            ("fused", "inception3b", "Inception -> fused Inception"),
        ]),
    "inception-branch-with-a-third-layer": (googlenet_with_a_longer_branch(3), (1, 3, 64, 64), [
        ("left_alone", "inception3a", "inception3a: branches 2 to 4 must have two layers each, as torchvision's have; "
                                      "they have 2, 2, 3"),
        ("fused", "inception3b", "Inception -> fused Inception"),
    ]),
    "inception-branch-with-one-layer": (googlenet_with_a_longer_branch(1), (1, 3, 64, 64), [
        ("left_alone", "inception3a", "inception3a: branches 2 to 4 must have two layers each, as torchvision's have; "
                                      "they have 2, 2, 1"),
    ]),
    "pool-to-2x2-head": (resnet18_with_a_2x2_pool_head, (1, 3, 64, 64), [
        ("left_alone", "avgpool", GLOBAL_POOL_LEFT_ALONE),
    ]),
    "batchnorm-forward-on-the-instance": (with_forward_doubled(resnet18_with, "layer1.0.bn1"), (1, 3, 64, 64), [
        ("left_alone", "layer1.0", "layer1.0.conv1: BatchNorm2d overrides how nn.BatchNorm2d computes (forward, on "
                                   "the instance); it is not folded"),
    ]),
    "relu-forward-on-the-instance": (with_forward_doubled(resnet18_with, "layer1.1.relu"), (1, 3, 64, 64), [
        ("left_alone", "layer1.1", "layer1.1.conv1: ReLU overrides how nn.ReLU computes (forward, on the instance); "
                                   "it is not fused"),
    ]),
    "relu-call-overridden": (lambda: randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                                CallingReLU())), (2, 3, 6, 6), [
        ("fused", "0", "Conv2d + BatchNorm2d -> ConvBNReLU"),
        ("left_alone", "2", "CallingReLU has no fused form; it runs as it is"),
    ]),
    "batchnorm-after-no-conv": (lambda: randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))), (2, 3, 6, 6), [
        ("left_alone", "1", "a BatchNorm folds only into the convolution it follows in a fused run; this one runs as "
                            "it is"),
    ]),
}


@pytest.mark.parametrize("case", list(UNKNOWN_PARTS))
def test_parts_it_does_not_know_stay_and_keep_working(case):
    make, shape, entries = UNKNOWN_PARTS[case]
    torch.manual_seed(0)
    original = make()
    fused = cnnfast.optimize(original)
    report = fused.cnnfast_report
    for kind, name, text in entries:
        assert (name, text) in getattr(report, kind)
    out, expected = run_both(original, fused, torch.randn(shape))
    assert_matches(out, expected)


@pytest.mark.parametrize("arch", ["resnet18", "googlenet", "vgg16_bn", "preact_resnet18"])
def test_autocast_leaves_the_fused_parts_in_their_own_dtype(arch):
    """Under torch.autocast a fused model computes in the dtype optimize() gave it (here float32),
    as its kernels do: it runs, and matches the float64 model within float32's tolerance."""
    original = build(arch)
    fused = cnnfast.optimize(original)
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = run_both(original, fused, x)
    _, expected = run_both(original, fused, x)
    assert out.dtype == torch.float32
    assert_matches(out, expected)


def test_under_autocast_fused_parts_take_what_the_parts_left_to_pytorch_give():
    """A part left to PyTorch computes in autocast's bfloat16; the fused part after it casts that
    back to its own float32: the mixed model runs, within bfloat16's tolerance."""
    original = randomize_bn(CustomNet())
    fused = cnnfast.optimize(original)
    x = torch.randn(2, 3, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = run_both(original, fused, x)
    _, expected = run_both(original, fused, x)
    assert_matches(out.to(torch.bfloat16), expected)


def test_a_hook_left_with_its_module_still_runs():
    original = hooked_batchnorm()
    fused = cnnfast.optimize(original)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        original(x)
        fused(x)
    torch.testing.assert_close(fused[1].kept, original[1].kept)


def test_a_stem_left_alone_is_reported_once():
    report = cnnfast.optimize(resnet18_with_other_activations()).cnnfast_report
    assert [name for name, _ in report.left_alone].count("conv1") == 1


def test_a_model_with_nothing_fused_keeps_its_layouts():
    """Its own code may .view its input or its weights, which channels_last would break."""

    class Flatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding_mode="circular", padding=1)
            self.fc = nn.Linear(4 * 5 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x.view(x.shape[0], 3, 5, 6)).view(x.shape[0], -1)) + self.conv.weight.view(4, -1).sum()

    original = Flatten().eval()
    fused = cnnfast.optimize(original)
    assert not fused.cnnfast_report.fused and fused.conv.weight.is_contiguous()
    out, expected = run_both(original, fused, torch.randn(2, 3, 5, 6))
    assert_matches(out, expected)


def test_a_parameter_shared_with_a_layer_left_alone_keeps_its_values_there():
    """A decoder tied to an encoder conv's weight: the fused conv gets its own folded weight, the
    decoder the original values; layers left alone that share a parameter still share it."""

    class TiedAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
            self.decoder = nn.ConvTranspose2d(6, 3, 3, padding=1, bias=False)
            self.decoder.weight = self.encoder[0].weight

        def forward(self, x):
            return self.decoder(self.encoder(x))

    original = randomize_bn(TiedAutoencoder())
    fused = cnnfast.optimize(original)
    assert isinstance(fused.encoder[0], ConvBNReLU) and fused.encoder[0].bn_folded
    out, expected = run_both(original, fused, torch.randn(2, 3, 5, 6))
    assert_matches(out, expected)
    # Two layers left alone that share a parameter share its cast: one tensor, not two copies.
    tied = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, padding=1), nn.Tanh(), nn.ConvTranspose2d(4, 4, 3, padding=1))
    tied[2].weight = tied[0].weight
    cast = cnnfast.optimize(tied.eval(), dtype=torch.bfloat16)
    assert cast[2].weight is cast[0].weight and cast[0].weight.dtype == torch.bfloat16


def test_an_unbatched_image_runs_as_nn_conv2d_takes_it():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()  # VGG's features
    fused = cnnfast.optimize(original)
    assert isinstance(fused[0], ConvBNReLU)
    x = torch.randn(3, 6, 6)
    out, expected = run_both(original, fused, x)
    assert out.shape == (8, 3, 3)
    assert_matches(out, expected)
    # Cast at the boundary like a batch, in another dtype too.
    half, _ = run_both(original, cnnfast.optimize(original, dtype=torch.bfloat16), x)
    assert half.dtype == torch.bfloat16
    assert_matches(half, expected)
    # The fused conv + ReLU alone, into out.
    written = torch.full((8, 6, 6), float("nan"))
    _, conv_relu = run_both(original[:2], nn.Identity(), x)
    with torch.no_grad():
        assert fused[0](x, out=written) is written
        with pytest.raises(ValueError, match="unbatched .* residual and out must be"):
            fused[0](x, residual=torch.zeros(1, 8, 6, 6))
    assert_matches(written, conv_relu)


def test_an_mlp_keeps_its_input_layout():
    """Only fused modules that take feature maps make the input channels_last, not linear layers."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.layers(x.view(x.shape[0], -1))

    torch.manual_seed(0)
    original = MLP().eval()
    fused = cnnfast.optimize(original)
    assert isinstance(fused.layers[0], LinearReLU)
    out, expected = run_both(original, fused, torch.randn(2, 3, 4, 4))
    assert_matches(out, expected)


def test_an_earlier_optimize_of_a_part_does_not_keep_it_unfused():
    """optimize(conv) fuses nothing but leaves its input conversion hook, which is not a user's hook."""
    model = build("resnet18", num_classes=10)
    model.layer1[0].conv1 = cnnfast.optimize(model.layer1[0].conv1)
    assert model.layer1[0].conv1._forward_pre_hooks
    fused = cnnfast.optimize(model)
    assert ("layer1.0", "BasicBlock -> fused BasicBlock") in fused.cnnfast_report.fused


def test_unknown_layers_are_the_same_modules_after():
    fused = cnnfast.optimize(randomize_bn(CustomNet()))
    assert [type(m).__name__ for m in fused.body] == [
        "ConvBNReLU", "Identity", "Identity", "GELU", "Upsample", "Conv2d", "ConvBNReLU", "Identity",
    ]
    assert type(fused.gate) is nn.Conv2d


def test_no_frozen_batchnorm_is_left_in_the_fused_parts():
    fused = cnnfast.optimize(resnet18_with(norm_layer=FrozenBatchNorm2d))
    assert not [name for name, m in fused.named_modules() if isinstance(m, (FrozenBatchNorm2d, nn.ReLU))]


def test_a_partly_fused_model_runs_without_no_grad_and_nothing_requires_grad():
    """A trainable unfused layer would hand the next fused op an input that requires grad."""
    original = randomize_bn(tv.resnext50_32x4d(num_classes=10))
    fused = cnnfast.optimize(original)
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.randn(1, 3, 64, 64)
    out = fused(x)  # outside no_grad
    with torch.no_grad():
        expected = copy.deepcopy(original).double()(x.double())
    assert_matches(out, expected)


def test_optimizing_again_with_another_dtype():
    original = build("resnet18", num_classes=10)
    twice = cnnfast.optimize(cnnfast.optimize(original), dtype=torch.bfloat16)
    fused_biases = {f"{name}.bias" for name, m in twice.named_modules() if isinstance(m, FUSED_LEAVES)}
    for name, p in twice.named_parameters():
        assert p.dtype == (torch.float32 if name in fused_biases else torch.bfloat16), name
    assert sum(isinstance(hook, ModelInput) for hook in twice._forward_pre_hooks.values()) == 1
    x = torch.randn(1, 3, 32, 32)
    out, expected = run_both(original, twice, x)
    assert out.dtype == torch.bfloat16
    assert_matches(out, expected)


def test_optimizing_again_after_model_to_puts_the_fused_biases_back_in_float32():
    """model.to(float16) rounds the fused biases too; optimizing again with a dtype makes them
    float32 again, as the fused ops take them (float32, or the input's dtype)."""
    original = build("resnet18", num_classes=10)
    again = cnnfast.optimize(cnnfast.optimize(original, dtype=torch.bfloat16).half(), dtype=torch.float32)
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    out, expected = run_both(original, again, torch.randn(1, 3, 32, 32))
    assert_matches(out.half(), expected)  # its weights went through bfloat16 and float16


def test_the_input_follows_the_model_to_another_dtype():
    original = build("resnet18", num_classes=10)
    fused = cnnfast.optimize(original, dtype=torch.bfloat16).float()  # as model.to(torch.float32)
    out, expected = run_both(original, fused, torch.randn(1, 3, 32, 32))
    assert out.dtype == torch.float32
    assert_matches(out.bfloat16(), expected)  # its weights went through bfloat16: that row of the table


def test_an_input_given_by_keyword_is_converted_too():
    fused = cnnfast.optimize(build("resnet18", num_classes=10), dtype=torch.bfloat16)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x=x), fused(x))


def test_inputs_inside_a_list_a_tuple_or_a_dict_are_converted_too():
    Views = collections.namedtuple("Views", "left right")

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, crops, views, named):
            assert all(t.dtype == torch.bfloat16 and t.is_contiguous(memory_format=torch.channels_last)
                       for t in [*crops, *views, *named.values()])
            return [self.net(t) for t in [*crops, *views, *named.values()]]

    fused = cnnfast.optimize(randomize_bn(Siamese()), dtype=torch.bfloat16)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        outputs = fused([x, x], Views(x, x), collections.defaultdict(list, a=x))
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_the_modules_of_a_container_root_convert_their_inputs():
    """An nn.ModuleDict has no forward: its user calls the modules in it, which take the inputs."""
    heads = nn.ModuleDict(dict(conv=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                               nested=nn.ModuleList([nn.Linear(3, 2)])))
    original = randomize_bn(heads)
    fused = cnnfast.optimize(original, dtype=torch.bfloat16)
    x, features = torch.randn(2, 3, 5, 5), torch.randn(2, 3)
    for name, part, inputs in [("conv", lambda m: m["conv"], x), ("linear", lambda m: m["nested"][0], features)]:
        out, expected = run_both(part(original), part(fused), inputs)
        assert out.dtype == torch.bfloat16, name
        assert_matches(out, expected)


def test_refuses_a_float64_model_without_a_dtype():
    model = build("resnet18", num_classes=10).double()
    with pytest.raises(TypeError, match="parameters are torch.float64; .* pass dtype="):
        cnnfast.optimize(model)
    fused = cnnfast.optimize(model, dtype=torch.float32)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    out, expected = run_both(model, fused, x)
    assert_matches(out, expected)


def test_optimizing_again_without_a_dtype_keeps_the_first_ones():
    half = cnnfast.optimize(build("resnet18", num_classes=10), dtype=torch.float16)
    again = cnnfast.optimize(half)
    x = torch.randn(1, 3, 32, 32)  # float32, cast at the boundary as the first optimize() did
    with torch.no_grad():
        assert again(x).dtype == torch.float16
        assert torch.equal(again(x), half(x))


def test_a_second_optimize_reports_what_the_first_fused():
    once = cnnfast.optimize(build_meta("googlenet"))
    twice = cnnfast.optimize(once)
    assert not twice.cnnfast_report.fused and twice.cnnfast_report.left_alone == once.cnnfast_report.left_alone
    assert "already fused by an earlier optimize(): " in str(twice.cnnfast_report)


def test_a_module_in_two_places_becomes_one_fused_module():
    fused = cnnfast.optimize(one_block_twice())
    assert isinstance(fused[0], cnnfast.nn.BasicBlock) and fused[1] is fused[0]
    assert cnnfast.optimize(fused).cnnfast_report.already_fused == ["0", "1"]


def test_a_shared_part_is_reported_in_each_place_as_in_the_first():
    torch.manual_seed(0)
    pool = nn.MaxPool2d(1)
    inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = randomize_bn(nn.Sequential(inner, pool, inner, pool))
    report = cnnfast.optimize(model).cnnfast_report
    assert ("3", "max pooling runs in PyTorch (channels_last) (the same module as 1)") in report.left_alone
    assert ("2", "the same module as 0, whose parts are reported there") in report.left_alone
    assert ("0.0", "Conv2d + BatchNorm2d + ReLU -> ConvBNReLU") in report.fused


def test_optimize_keeps_the_pre_activations_statistics_in_float32():
    fused = cnnfast.optimize(build("preact_resnet18", num_classes=10), dtype=torch.float16)
    buffers = [b for m in fused.modules() if isinstance(m, BatchNormReLU) for b in (m.scale, m.shift)]
    assert buffers and all(b.dtype == torch.float32 for b in buffers)
    x = torch.randn(1, 3, 32, 32)
    out, expected = run_both(build("preact_resnet18", num_classes=10), fused, x)
    assert out.dtype == torch.float16
    assert_matches(out, expected)


def test_optimizing_again_with_a_backend_sets_it_on_what_was_fused_before():
    once = cnnfast.optimize(build_meta("resnet18"))
    twice = cnnfast.optimize(once, backend="torch")
    backends = {m.backend for m in twice.modules() if isinstance(m, FUSED_LEAVES)}
    assert backends == {"torch"}
    assert {m.backend for m in cnnfast.optimize(twice).modules() if isinstance(m, FUSED_LEAVES)} == {"torch"}


def test_optimizing_twice_changes_nothing():
    once = cnnfast.optimize(build("resnet18", num_classes=10))
    twice = cnnfast.optimize(once)
    assert not twice.cnnfast_report.fused
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twice(x), once(x))


# ---------------------------------------------------------------- a model's parts called by other code


class TwoOutputs(nn.Module):
    """A parent that runs a ResNet's parts itself (a retrieval model): the stem and the stages, then
    an embedding from avgpool alone, the logits from fc, and the model's relu used on its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        normalized = []
        if hasattr(m, "bn_final"):  # a pre-activation ResNet's: the BatchNorm alone, its negative values kept
            normalized.append(m.bn_final(x))
            x = m.relu(normalized[0])
        embedding = torch.flatten(m.avgpool(x), 1)
        return embedding, m.fc(embedding), m.relu(embedding - embedding.mean()), *normalized


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_a_parent_that_calls_the_parts_by_name_gets_what_they_computed(name):
    """optimize() fuses bn1 and relu into conv1, relu into bn_final and fc into avgpool, which is
    right in the model's own forward; called by other code, avgpool is the pool, fc the linear
    layer, relu a ReLU, bn_final the BatchNorm."""
    original = build(name, num_classes=10)
    parent = cnnfast.optimize(TwoOutputs(original).eval())
    assert dict(parent.cnnfast_report.fused)["model.avgpool"] == "AdaptiveAvgPool2d + Linear -> GlobalAvgPoolLinear"
    x = torch.randn(2, 3, 32, 32)
    outputs, expected = run_both(TwoOutputs(original), parent, x)
    for output, reference in zip(outputs, expected, strict=True):
        assert output.shape == reference.shape
        assert_matches(output, reference)
    logits, _ = run_both(original, parent.model, x)
    assert_matches(logits, expected[1])  # and the model's own forward runs the fused head


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "preact_resnet18"])
def test_a_fused_head_called_on_its_own_is_the_pool_then_the_linear_layer(name):
    original = build(name, num_classes=10)
    fused = cnnfast.optimize(original)
    features = torch.randn(2, original.fc.in_features, 3, 4)
    with torch.no_grad():
        pooled = fused.avgpool(features)
        assert_matches(pooled, original.double().avgpool(features.double()))
        assert_matches(fused.avgpool(features[0]), original.avgpool(features[0].double()))  # one unbatched map
        assert_matches(fused.fc(pooled.flatten(1)), original.fc(pooled.double().flatten(1)))
    # A class activation map reads the head's weights through fc.
    assert torch.equal(fused.fc.weight, original.fc.weight.float()) and fused.fc.in_features == original.fc.in_features
    copied = copy.deepcopy(fused)  # the copy's fc reads the copy's head
    assert copied.fc.head is copied.avgpool and copied.fc.model_forward is copied.avgpool.model_forward


@pytest.mark.parametrize("name, part, replacement", [
    ("resnet18", "fc", nn.Identity()), ("resnet18", "fc", nn.Linear(512, 3)), ("resnet18", "relu", nn.ReLU()),
    ("resnet18", "conv1", nn.Conv2d(3, 64, 7, 2, 3)), ("googlenet", "dropout", nn.Tanh()),
], ids=["fc-identity", "fc-linear", "relu", "conv1", "googlenet-dropout"])
def test_a_fused_part_replaced_after_optimize_is_refused_by_name(name, part, replacement):
    """model.fc = nn.Identity() after optimize() would return the fused head's logits as features;
    a new conv1 would run without the BatchNorm folded into the old one, GoogLeNet's new dropout
    on the logits."""
    fused = cnnfast.optimize(build(name, num_classes=10))
    setattr(fused, part, replacement)
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"^{type(fused).__name__}: {part} was replaced after "
                                                            "cnnfast.optimize"):
        fused(torch.randn(1, 3, 32, 32))


def test_a_model_with_a_fused_stem_and_head_pickles_and_replicates():
    """optimize() puts FusedForward before the model's class: torch.save of the whole model loads
    it back, and a replica (nn.DataParallel's, which copies the model's attributes) runs its own
    modules."""
    original = build("resnet18", num_classes=10)
    fused = cnnfast.optimize(original)
    assert isinstance(fused, TvResNet) and type(fused).__name__ == "ResNet"
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(fused) and loaded.fc.head is loaded.avgpool
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
        assert loaded.avgpool(torch.randn(2, 512, 3, 3)).shape == (2, 512, 1, 1)
    replica = fused._replicate_for_data_parallel()
    replica._modules = dict(fused._modules, layer4=copy.deepcopy(fused.layer4).apply(
        lambda m: m.weight.data.zero_() if isinstance(m, ConvBNReLU) else None))
    with torch.no_grad():
        assert not torch.equal(replica(x), fused(x))


def test_a_part_called_by_name_on_another_thread_during_the_forward_is_unfused():
    """The forward is counted on its own thread: another thread's model.avgpool(x) is the pool."""
    fused = cnnfast.optimize(build("resnet18", num_classes=10))
    pooled = []

    def on_another_thread(module, args, output):
        thread = threading.Thread(target=lambda: pooled.append(fused.avgpool(output)))
        thread.start()
        thread.join()

    fused.layer4.register_forward_hook(on_another_thread)
    with torch.no_grad():
        assert fused(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert pooled[0].shape == (2, 512, 1, 1)


def raise_keyboard_interrupt(*args):
    raise KeyboardInterrupt


def refuse_one_channel(module, args):
    if args[0].shape[1] == 1:
        raise ValueError("expected RGB")


@pytest.mark.parametrize("how", ["own-pre-hook", "prepended-pre-hook", "keyboard-interrupt"])
def test_the_parts_called_by_name_are_unfused_again_however_a_forward_ended(how):
    """A forward that ends in an exception (one of the model's own pre-hooks, before its forward;
    a KeyboardInterrupt inside it) leaves no forward counted as running."""
    original = build("resnet18", num_classes=10)
    if how == "own-pre-hook":
        original.register_forward_pre_hook(refuse_one_channel)
    fused = cnnfast.optimize(original)
    if how == "prepended-pre-hook":
        fused.register_forward_pre_hook(refuse_one_channel, prepend=True)
    if how == "keyboard-interrupt":
        fused.layer2.register_forward_hook(raise_keyboard_interrupt)
    # The pre-hooks' own error, raised before the forward (the fused stem would refuse 1 channel too).
    expected = (KeyboardInterrupt, "") if how == "keyboard-interrupt" else (ValueError, "expected RGB")
    with torch.no_grad(), pytest.raises(expected[0], match=expected[1]):
        fused(torch.randn(1, 1 if how != "keyboard-interrupt" else 3, 32, 32))
    features = torch.randn(2, 512)
    with torch.no_grad():
        assert fused.avgpool(features[:, :, None, None]).shape == (2, 512, 1, 1)
        assert_matches(fused.fc(features), copy.deepcopy(original.fc).double()(features.double()))


# ---------------------------------------------------------------- the bad-input contract


@pytest.fixture(scope="module")
def fused_resnet18():
    return cnnfast.optimize(build("resnet18", num_classes=10))


def test_refuses_a_model_in_training_mode():
    with pytest.raises(RuntimeError, match="training mode"):
        cnnfast.optimize(models.resnet18(num_classes=10))


def test_a_fused_model_put_in_training_mode_refuses_to_run(fused_resnet18):
    model = copy.deepcopy(fused_resnet18).train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="ConvBNReLU: in training mode, but fused modules are "
                                                             r"for inference .*call \.eval\(\)"):
        model(torch.randn(1, 3, 32, 32))


def test_the_training_mode_error_names_three_modules_and_counts_the_rest():
    with pytest.raises(RuntimeError, match=r"training mode \(ResNet, conv1, bn1 and \d+ more\)"):
        cnnfast.optimize(models.resnet18(num_classes=10))
    with pytest.raises(RuntimeError, match=r"training mode \(Conv2d\); "):
        cnnfast.optimize(nn.Conv2d(3, 4, 3))


def test_a_half_model_with_float32_batchnorm_runs_pre_activation_blocks():
    """fp16 weights with float32 BN (a mixed-precision checkpoint): the pre-activation BN + ReLU keeps
    the activations in float16, as nn.BatchNorm2d does."""
    original = build("preact_resnet18", num_classes=10).half()
    for bn in original.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.float()
    fused = cnnfast.optimize(original)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = fused(x.half())
        expected = copy.deepcopy(original).double()(x.double())
    assert out.dtype == torch.float16
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["model-dtype", "float16"])
def test_refuses_a_lazy_module_before_its_first_forward(dtype):
    """Its parameters have no shape yet: cast, they became empty tensors (the model failed on its
    next call); uncast, PyTorch raised from inside the cast. Once run, it is fused like any conv."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(RuntimeError, match=r"^optimize: 0 \(LazyConv2d\) has uninitialized weight, bias: run the "
                                           "model once on a sample input first"):
        cnnfast.optimize(model, dtype=dtype)
    with torch.no_grad():
        model(torch.randn(1, 3, 5, 5))
    assert isinstance(cnnfast.optimize(model, dtype=dtype)[0], ConvBNReLU)


def test_refuses_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    with pytest.raises(RuntimeError, match=r"BatchNorm '1' has no running statistics"):
        cnnfast.optimize(model)


def test_refuses_what_is_not_a_model_or_a_float_dtype():
    with pytest.raises(TypeError, match="nn.Module"):
        cnnfast.optimize(lambda x: x)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16, got torch.int8"):
        cnnfast.optimize(nn.Conv2d(3, 4, 3).eval(), dtype=torch.int8)


def test_wrong_input_channels(fused_resnet18):
    with torch.no_grad(), pytest.raises(ValueError, match="input has 4 channels"):
        fused_resnet18(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["model-dtype", "bfloat16"])
def test_integer_input(dtype):
    # The model boundary casts float inputs to the model's dtype, never integers.
    fused = cnnfast.optimize(build("resnet18", num_classes=10), dtype=dtype)
    with torch.no_grad(), pytest.raises(TypeError, match="dtype torch.int64"):
        fused(torch.randint(0, 255, (1, 3, 32, 32)))


def test_input_on_another_device(fused_resnet18):
    with torch.no_grad(), pytest.raises(RuntimeError, match="one device"):
        fused_resnet18(torch.empty(1, 3, 32, 32, device="meta"))


def test_without_no_grad_an_input_that_requires_grad_is_refused(fused_resnet18):
    with pytest.raises(RuntimeError, match="no backward"):
        fused_resnet18(torch.randn(1, 3, 32, 32, requires_grad=True))


def test_not_inplace_leaves_the_original_untouched():
    original = build("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    types, state = [type(m) for m in original.modules()], {k: v.clone() for k, v in original.state_dict().items()}
    with torch.no_grad():
        before = original(x)
    fused = cnnfast.optimize(original)
    assert fused is not original and not hasattr(original, "cnnfast_report") and not original._forward_pre_hooks
    assert [type(m) for m in original.modules()] == types
    assert original.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in original.state_dict().items())
    with torch.no_grad():
        assert torch.equal(original(x), before)


def test_inplace_returns_the_same_model():
    model = build("vgg16_bn", num_classes=10)
    assert cnnfast.optimize(model, inplace=True) is model
    assert isinstance(model.features[0], ConvBNReLU) and model.cnnfast_report.fused


def known_roots():
    """Known blocks given to optimize() as the model itself: (block, input shape)."""
    from torchvision.models.googlenet import BasicConv2d as TvBasicConv2d
    from torchvision.models.googlenet import Inception as TvInception
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from cnnfast.models.preact import PreActBasicBlock as PlainPreActBasicBlock

    torch.manual_seed(0)
    return {
        "BasicBlock": (TvBasicBlock(8, 8), (2, 8, 6, 5)),
        "Bottleneck": (TvBottleneck(16, 4), (2, 16, 6, 5)),
        "BasicConv2d": (TvBasicConv2d(3, 8, kernel_size=3, padding=1), (2, 3, 6, 5)),
        "Inception": (TvInception(8, 4, 4, 6, 2, 4, 4), (2, 8, 6, 5)),
        "PreActBasicBlock": (PlainPreActBasicBlock(8, 16, stride=2), (2, 8, 6, 5)),
    }


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("root", ["BasicBlock", "Bottleneck", "BasicConv2d", "Inception", "PreActBasicBlock"])
def test_a_known_block_given_as_the_model_is_fused(root, inplace):
    """optimize(block) fuses the block itself (a new module, with inplace=True too), reported
    under its class name, and matches it."""
    block, shape = known_roots()[root]
    original = randomize_bn(block).eval()
    fused = cnnfast.optimize(original, inplace=inplace)
    assert type(fused).__module__.startswith("cnnfast.") and fused is not original
    (entry,) = fused.cnnfast_report.fused
    assert entry[0] == root and entry[1].startswith(f"{root} -> fused ") and not fused.cnnfast_report.left_alone
    assert_fully_fused(fused)
    out, expected = run_both(original, fused, torch.randn(shape))
    assert_matches(out, expected)
    again = cnnfast.optimize(fused).cnnfast_report  # an optimized block given again: nothing new to fuse
    assert again.already_fused == [type(fused).__name__] and not again.fused and not again.left_alone


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the ops' shape checks hold for the traced shape
def test_a_torchscript_module_is_refused_with_what_to_do():
    """What the error says to do works: the optimized eager model traces."""
    original = build("resnet18", num_classes=10)
    with pytest.raises(TypeError, match="a TorchScript module cannot be changed; optimize the eager model, then "
                                        "torch.jit.trace, torch.export or torch.compile the result"):
        cnnfast.optimize(torch.jit.script(original))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(cnnfast.optimize(original), x)
    out, expected = run_both(original, traced, x)
    assert_matches(out, expected)


def test_a_lone_layer_given_as_the_model_is_reported():
    report = cnnfast.optimize(nn.Conv2d(3, 8, 3).eval()).cnnfast_report
    assert report.left_alone == [("Conv2d", "a Conv2d outside an nn.Sequential run or a known block is not fused")]
    fused = cnnfast.optimize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval())[0]
    assert cnnfast.optimize(fused).cnnfast_report.already_fused == ["ConvBNReLU"]


# ---------------------------------------------------------------- torch.compile and CUDA graphs


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])  # GoogLeNet's branches write into slices (out=)
def test_torch_compile_fullgraph(name):
    original = build(name, num_classes=10)
    fused = cnnfast.optimize(original)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    out, expected = run_both(original, compiled, x)
    assert_matches(out, expected)
    with torch.no_grad():
        assert torch.equal(out, fused(x))


FEATURE_NODES = {"resnet18": "layer4", "googlenet": "inception5b", "preact_resnet18": "layer4", "vgg16_bn": "features"}


@pytest.mark.parametrize("name", list(FEATURE_NODES))
def test_torch_fx_traces_a_fused_model_with_its_fused_modules_as_leaves(name):
    """Symbolic tracing, and torchvision's create_feature_extractor (which traces the model in
    training mode too), take FX_LEAF_MODULES as leaves; the graph, without the model's hooks, runs
    a fused head's parts one by one (the pool, then the linear layer): the same logits."""
    original = build(name, num_classes=10)
    fused = cnnfast.optimize(original)
    x = torch.randn(2, 3, 64, 64)

    class FusedLeaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, FX_LEAF_MODULES) or super().is_leaf_module(module, name)

    traced = torch.fx.GraphModule(fused, FusedLeaves().trace(fused))
    out, expected = run_both(original, traced, x)
    assert_matches(out, expected)

    returned = {FEATURE_NODES[name]: "features"}
    extractor = create_feature_extractor(fused, returned, tracer_kwargs={"leaf_modules": list(FX_LEAF_MODULES)})
    assert not fused.training
    reference = create_feature_extractor(copy.deepcopy(original).double(), returned)
    with torch.no_grad():
        assert_matches(extractor(x)["features"], reference(x.double())["features"])


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_torch_export(name):
    original = build(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(cnnfast.optimize(original), (x,))
    out, expected = run_both(original, exported.module(), x)
    assert_matches(out, expected)


# The models of the GPU benchmarks, on each GPU backend and on the default (the tuning table's mix).
GPU_NAMES = ["resnet50", "resnet18", "vgg16_bn", "googlenet", "alexnet"]
GPU_BACKENDS = ["triton", "cuda", "torch", None]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_bfloat16_matches_original(name, backend):
    original = build(name).cuda()
    fused = cnnfast.optimize(original, dtype=torch.bfloat16, backend=backend)
    assert_fully_fused(fused)
    x = torch.randn(4, 3, input_size(name), input_size(name), device="cuda")
    out, expected = run_both(original, fused, x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 1000)
    assert_matches(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
def test_graph_capture_and_replay(backend):
    fused = cnnfast.optimize(build("resnet18").cuda(), dtype=torch.bfloat16, backend=backend)
    static_x = torch.randn(1, 3, 224, 224, device="cuda")
    with torch.no_grad():
        # Warm up on a side stream: autotuning and compilation must happen before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fused(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fused(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = fused(new_x)
    # The same kernels with the same tiles on the same input.
    torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
