import json
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnfast import models
from cnnfast.analysis import analyze, analyze_arch, format_table

LAYER_KEYS = {
    "name", "type", "input_shape", "output_shape", "kernel_size", "stride", "padding",
    "params", "macs", "flops", "activation_bytes", "pool_ops",
}


def _layer(analysis, name):
    (layer,) = [layer for layer in analysis.layers if layer.name == name]
    return layer


# torchvision's published parameter counts (its model builders' documentation).
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840, "vgg16": 138_357_544, "vgg19": 143_667_240, "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248, "googlenet": 6_624_904, "resnet18": 11_689_512, "resnet34": 21_797_672,
    "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808,
}


@pytest.fixture(scope="module")
def alexnet():
    return analyze_arch("alexnet")


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_totals_match_flop_counter_and_param_count(name):
    with torch.device("meta"):
        model = models.get_model(name).eval()
    size = models.DEFAULT_INPUT_SIZE[name]
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    totals = analyze(model, size).totals
    assert totals["macs"] == counter.get_total_flops() // 2
    assert totals["flops"] == 2 * totals["macs"]
    if name in TORCHVISION_PARAMS:
        assert totals["params"] == TORCHVISION_PARAMS[name]


def test_alexnet_conv1_as_in_the_lecture_table(alexnet):
    conv1 = _layer(alexnet, "features.0")
    assert (conv1.type, conv1.input_shape, conv1.output_shape) == ("conv", [3, 227, 227], [64, 56, 56])
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ([11, 11], [4, 4], [2, 2])
    assert conv1.activation_bytes / 1024 == 784
    assert conv1.params == 64 * 3 * 11 * 11 + 64 == 23_296
    assert conv1.macs == 64 * 56 * 56 * 3 * 11 * 11 == 72_855_552
    assert conv1.flops == 2 * conv1.macs and conv1.pool_ops == 0


def test_alexnet_pool1_and_fc6(alexnet):
    pool1 = _layer(alexnet, "features.2")
    assert (pool1.type, pool1.output_shape, pool1.kernel_size, pool1.stride) == ("maxpool", [64, 27, 27], [3, 3], [2, 2])
    assert pool1.pool_ops == 64 * 27 * 27 * 9 and pool1.macs == 0 and pool1.params == 0
    fc6 = _layer(alexnet, "classifier.1")
    assert (fc6.type, fc6.input_shape, fc6.output_shape) == ("linear", [9216], [4096])
    assert fc6.params == 9216 * 4096 + 4096 == 37_752_832
    assert fc6.macs == 9216 * 4096 and fc6.kernel_size is None


def test_adaptive_pools_report_their_effective_window(alexnet):
    assert _layer(alexnet, "avgpool").kernel_size == [1, 1]
    resnet_gap = _layer(analyze_arch("resnet50"), "avgpool")
    assert (resnet_gap.type, resnet_gap.kernel_size, resnet_gap.stride, resnet_gap.padding) == ("avgpool", [7, 7], [7, 7], [0, 0])
    assert resnet_gap.pool_ops == 2048 * 49
    # 7 -> 3 has overlapping windows of 3 (starts 0, 2, 4): no single kernel, but exact ops.
    (uneven,) = analyze(nn.AdaptiveMaxPool2d(3), 7, in_channels=5).layers
    assert (uneven.type, uneven.kernel_size, uneven.stride) == ("maxpool", None, None)
    assert uneven.pool_ops == 5 * 9 * 9


def test_known_model_totals():
    assert analyze_arch("vgg16").totals["macs"] / 1e9 == pytest.approx(15.47, abs=0.01)
    assert analyze_arch("resnet50").totals["macs"] / 1e9 == pytest.approx(4.09, abs=0.005)
    assert analyze_arch("vgg16").totals["params"] == 138_357_544


def test_memory_total_sums_conv_linear_and_pool_outputs(alexnet):
    counted = [layer for layer in alexnet.layers if layer.type in ("conv", "linear", "maxpool", "avgpool")]
    assert alexnet.totals["activation_bytes"] == sum(layer.activation_bytes for layer in counted)
    # Output elements x window: 64x27x27 x 9 + 192x13x13 x 9 + 256x6x6 x 9, and the 6x6 adaptive pool's 1x1 windows.
    assert alexnet.pool_ops == 419_904 + 292_032 + 82_944 + 9_216


def test_reused_relu_gives_one_row_per_call():
    analysis = analyze_arch("resnet18")
    calls = [layer for layer in analysis.layers if layer.name == "layer1.0.relu"]
    assert len(calls) == 2 and all(c.type == "relu" and c.output_shape == [64, 56, 56] for c in calls)
    bn = _layer(analysis, "bn1")
    assert (bn.type, bn.params, bn.macs) == ("batchnorm", 128, 0)


def test_batch_scaling():
    one, many = analyze_arch("resnet18"), analyze_arch("resnet18", batch=256)
    assert many.batch == 256
    for key in ("macs", "flops", "activation_bytes"):
        assert many.totals[key] == 256 * one.totals[key]
    assert many.totals["params"] == one.totals["params"]
    assert many.pool_ops == 256 * one.pool_ops
    assert [layer.output_shape for layer in many.layers] == [layer.output_shape for layer in one.layers]


def test_rectangular_input_and_channels():
    analysis = analyze(models.get_model("resnet18"), (160, 96), in_channels=3)
    assert analysis.input_size == (160, 96) and analysis.image_text == "160x96"
    assert format_table(analysis).splitlines()[0] == "model at 160x96, per image"
    assert _layer(analysis, "conv1").output_shape == [64, 80, 48]
    assert analyze(models.get_model("resnet18"), (64, 64)).input_size == 64  # square: an int, as the CLI gives
    gray = analyze(nn.Conv2d(1, 8, 3), 10, in_channels=1)
    assert gray.layers[0].macs == 8 * 8 * 8 * 9


def test_a_grouped_convolution_counts_the_channels_of_its_group(recwarn):
    """Each output of a grouped conv reads C / groups input channels: 8 -> 8 in 4 groups, 3x3, on a
    4x4 map is 8 * 16 outputs x 2 channels x 9 taps, as FlopCounterMode counts it (no warning)."""
    analysis = analyze(nn.Conv2d(8, 8, 3, padding=1, groups=4), 4, in_channels=8)
    assert (analysis.layers[0].macs, analysis.layers[0].params) == (8 * 16 * 2 * 9, 8 * 2 * 9 + 8)
    assert not [w for w in recwarn if "flop_counter" in str(w.message)]


def test_an_empty_batch_counts_nothing_but_keeps_the_shapes():
    empty, one = analyze_arch("resnet18", batch=0), analyze_arch("resnet18")
    assert empty.batch == 0 and empty.totals["macs"] == empty.totals["activation_bytes"] == 0
    assert empty.totals["params"] == one.totals["params"]
    assert [layer.output_shape for layer in empty.layers] == [layer.output_shape for layer in one.layers]


def test_caller_model_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = analyze(model, 8, batch=2)
    assert all(module.training for module in model.modules())
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())
    assert [layer.type for layer in analysis.layers] == ["conv", "batchnorm", "relu", "other"]
    assert analysis.totals["params"] == 4 * 27 + 4 + 8


def test_to_dict_schema_is_exact(alexnet):
    data = json.loads(json.dumps(alexnet.to_dict()))
    assert set(data) == {"arch", "input_size", "batch", "layers", "totals"}
    assert (data["arch"], data["input_size"], data["batch"]) == ("alexnet", 227, 1)
    assert set(data["totals"]) == {"params", "macs", "flops", "activation_bytes"}
    assert all(set(layer) == LAYER_KEYS for layer in data["layers"])
    assert {layer["type"] for layer in data["layers"]} == {"conv", "relu", "maxpool", "avgpool", "linear", "other"}


@pytest.mark.parametrize("name, size, layer", [("vgg16", 16, "features.30"), ("alexnet", 32, "features.12")])
def test_too_small_input_names_the_layer(name, size, layer):
    with pytest.raises(ValueError) as error:
        analyze_arch(name, size)
    assert repr(layer) in str(error.value) and f"{size}x{size}" in str(error.value)


def test_vanishing_output_without_an_error_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((0, 1)), nn.Flatten())
    with pytest.raises(ValueError, match=r"vanishes at layer '1'.*5x5|5x5.*vanishes at layer '1'"):
        analyze(model, 5)


class UncountedLayers(nn.Module):
    """A functional conv and a transposed conv: MACs the table's Conv2d/Linear rows cannot see (and
    a GroupNorm, a layer of another kind with parameters but no MACs)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.norm(self.up(torch.nn.functional.conv2d(x, self.weight))).mean((2, 3)))


def test_macs_the_table_cannot_see_are_warned_about():
    with pytest.warns(UserWarning) as warned:
        totals = analyze(UncountedLayers(), 16).totals
    assert totals["macs"] == 80  # the Linear's 8 x 10: the table's own count, not replaced
    # The transposed conv: 16 x 28 x 28 inputs x 8 x 2 x 2; the functional conv: 16 x 14 x 14 x 3 x 3 x 3.
    assert [str(warning.message) for warning in warned] == [
        "UncountedLayers at input 16x16: the table counts 80 MACs but torch.utils.flop_counter counts 185,104 for "
        "the same pass; layers it counts otherwise: up (100,352 against 0); 84,672 MACs of calls outside the "
        "layers (a functional op in a forward)"]


class SharedConvThenUncounted(nn.Module):
    """A conv used in two places (one layer, counted twice by both), then a transposed conv."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 3, 3, padding=1)
        self.a, self.b = nn.Sequential(conv, nn.ReLU()), nn.Sequential(nn.ReLU(), conv)
        self.up = nn.ConvTranspose2d(3, 2, 2)

    def forward(self, x):
        return self.up(self.b(self.a(x)))


@pytest.mark.parametrize("model, named", [
    (SharedConvThenUncounted(), "layers it counts otherwise: up (1,536 against 0)"),
    (nn.ConvTranspose2d(3, 4, 2), "layers it counts otherwise: the model itself (3,072 against 0)"),
], ids=["shared-conv", "the-model-is-one-layer"])
def test_the_warning_names_only_the_layers_counted_otherwise(model, named):
    with pytest.warns(UserWarning) as warned:
        analyze(model, 8)
    (message,) = [str(warning.message) for warning in warned]
    assert message.endswith(named)


def test_every_architecture_agrees_with_the_flop_counter_without_a_warning(recwarn):
    for name in ("alexnet", "googlenet", "resnet50"):
        analyze_arch(name)
    assert not [warning for warning in recwarn if "flop_counter" in str(warning.message)]


def test_a_layer_called_with_keyword_arguments_is_counted():
    class KeywordCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(input=x)

    (row,) = analyze(KeywordCall(), 16).layers
    assert row.input_shape == [3, 16, 16] and row.macs == 4 * 14 * 14 * 3 * 9


def test_a_fused_layer_the_input_is_too_small_for_is_named():
    import cnnfast

    fused = cnnfast.optimize(nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU()).eval())
    with pytest.raises(ValueError, match=r"layer '0' \(ConvBNReLU\) fails on its 3x3x3 feature map.*larger than"):
        analyze(fused, 3)


def test_integers_of_other_kinds_are_sizes_too():
    import numpy

    conv = nn.Conv2d(3, 4, 3)
    plain = analyze(conv, 16, batch=2).totals
    assert analyze(conv, (numpy.int64(16), numpy.int64(16)), batch=numpy.int64(2)).totals == plain
    assert analyze(conv, torch.Size([16, 16]), batch=torch.tensor(2)).totals == plain


@pytest.mark.parametrize("call", [
    lambda: analyze_arch("resnet18", input_size=224.0), lambda: analyze_arch("resnet18", input_size="224"),
    lambda: analyze_arch("resnet18", batch=1.5), lambda: analyze(nn.Conv2d(3, 4, 3), (8, 8, 8)),
    lambda: analyze(nn.Conv2d(3, 4, 3), True), lambda: analyze(nn.Conv2d(3, 4, 3), 8, batch=torch.tensor(True)),
    lambda: analyze(nn.Conv2d(3, 4, 3), 8, batch=torch.tensor([2])),
], ids=["float-size", "str-size", "float-batch", "three-sizes", "bool-size", "bool-tensor-batch", "1-d-tensor-batch"])
def test_sizes_of_the_wrong_type_are_a_type_error_naming_them(call):
    with pytest.raises(TypeError, match="input_size must be an int or an .height, width. pair of ints"):
        call()


def test_a_name_passed_as_the_model_points_at_analyze_arch():
    with pytest.raises(TypeError, match="analyze takes an nn.Module, got str .analyze_arch takes a name."):
        analyze("resnet18")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="resnet18"):
        analyze_arch("resnet19")


def test_vgg19_batch_256_is_fast():
    analyze_arch("vgg19")  # first call pays one-time imports and dispatch warm-up
    start = time.perf_counter()
    analysis = analyze_arch("vgg19", batch=256)
    assert time.perf_counter() - start < 2.0
    assert analysis.totals["macs"] == 256 * analyze_arch("vgg19").totals["macs"]


def test_format_table(alexnet):
    table = format_table(alexnet)
    lines = table.splitlines()
    assert "alexnet" in lines[0] and "227" in lines[0]
    conv1 = next(line for line in lines if line.startswith("features.0 "))
    assert "64x56x56" in conv1 and "784.0" in conv1 and "23.296" in conv1 and "72.856" in conv1
    assert lines[-1].startswith("total") and "61100.840" in lines[-1]
    relu = next(line for line in lines if line.startswith("features.1 "))
    assert relu.split()[1:4] == ["relu", "64x56x56", "-"]
    assert len(lines) == 3 + len(alexnet.layers) + 2
