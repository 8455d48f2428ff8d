import dataclasses
import json

import pytest

from cnnfast.analysis import Claim, compute_claims

# Closed forms taken from the lecture's rounded figures rather than from an exact formula.
ROUNDED_FIGURES = {"resnet34_vs_resnet18_macs": 0.02}


@pytest.fixture(scope="module")
def claims():
    return {claim.key: claim for claim in compute_claims()}


def test_expected_claims_present(claims):
    assert set(claims) >= {
        "vgg_3x3_vs_5x5_params", "vgg_3x3_vs_5x5_macs",
        "vgg_pool_double_memory", "vgg_pool_double_params", "vgg_pool_double_macs",
        "googlenet_stem_vs_vgg16_macs", "googlenet_stem_vs_vgg16_params", "googlenet_stem_vs_vgg16_activation_bytes",
        "gap_head_vs_fc_head_params", "gap_head_vs_fc_head_macs",
        "alexnet_conv_memory_fraction", "alexnet_fc_params_fraction", "alexnet_conv_macs_fraction",
        "alexnet_pool_ops_vs_conv_macs", "resnet34_vs_resnet18_macs",
        "bottleneck_vs_basic_macs", "bottleneck_vs_basic_params",
        "bottleneck_vs_basic_at_c_macs", "bottleneck_vs_basic_at_c_params",
        "vgg16_vs_alexnet_params", "vgg16_vs_alexnet_macs", "zfnet_vs_alexnet_params", "zfnet_vs_alexnet_macs",
        "vgg16_fc_params_fraction",
    }


@pytest.mark.parametrize(
    "key, value",
    [
        ("vgg_3x3_vs_5x5_params", 25 / 18),
        ("vgg_3x3_vs_5x5_macs", 25 / 18),
        ("vgg_pool_double_memory", 1 / 2),
        ("vgg_pool_double_params", 4),
        ("vgg_pool_double_macs", 1),
        ("bottleneck_vs_basic_macs", 17 / 288),
        ("bottleneck_vs_basic_params", 17 / 288),
        ("bottleneck_vs_basic_at_c_macs", 17 / 18),
        ("bottleneck_vs_basic_at_c_params", 17 / 18),
    ],
)
def test_exact_closed_forms(claims, key, value):
    assert claims[key].closed_form == value
    assert claims[key].predicted == pytest.approx(value, rel=1e-9, abs=0)


def test_every_closed_form_holds(claims):
    for key, claim in claims.items():
        if claim.closed_form is not None:
            tolerance = ROUNDED_FIGURES.get(key, 1e-9)
            assert claim.predicted == pytest.approx(claim.closed_form, rel=tolerance, abs=0), key
            assert claim.closed_form_text


def test_resnet_depth_uses_the_lecture_figures(claims):
    claim = claims["resnet34_vs_resnet18_macs"]
    assert claim.details["lecture_gflop"] == {"resnet18": 1.8, "resnet34": 3.6}
    assert claim.details["resnet18_gmac"] == pytest.approx(1.8, rel=0.02)
    assert claim.details["resnet34_gmac"] == pytest.approx(3.6, rel=0.02)


def test_qualitative_claims_hold(claims):
    assert claims["alexnet_conv_memory_fraction"].predicted > 0.5
    assert claims["alexnet_fc_params_fraction"].predicted > 0.5
    assert claims["alexnet_conv_macs_fraction"].predicted > 0.5
    assert claims["alexnet_pool_ops_vs_conv_macs"].predicted < 0.01
    for quantity in ("macs", "params", "activation_bytes"):
        assert claims[f"googlenet_stem_vs_vgg16_{quantity}"].predicted > 5
    assert claims["gap_head_vs_fc_head_params"].predicted > 100
    assert claims["gap_head_vs_fc_head_macs"].predicted > 100
    # VGG-16 (138.4 M parameters, 15.5 GMACs at 224) and ZFNet (107.6 M, 2.48 GMACs at 224) against
    # AlexNet (61.1 M, 0.717 GMACs at 227); VGG-16's three linear layers hold 123.6 M of its parameters.
    assert claims["vgg16_vs_alexnet_params"].predicted == pytest.approx(138_357_544 / 61_100_840)
    assert claims["vgg16_vs_alexnet_macs"].predicted > 20
    assert 1.7 < claims["zfnet_vs_alexnet_params"].predicted < 1.8 and claims["zfnet_vs_alexnet_macs"].predicted > 3
    assert claims["vgg16_fc_params_fraction"].predicted == pytest.approx(123_642_856 / 138_357_544)


def test_details_hold_the_raw_numbers(claims):
    small_kernels = claims["vgg_3x3_vs_5x5_params"].details
    assert small_kernels["one_5x5"]["params"] == 25 * 256**2
    assert small_kernels["two_3x3"]["params"] == 18 * 256**2
    stem = claims["googlenet_stem_vs_vgg16_macs"].details
    assert stem["googlenet_stem"]["layers"][-1] == "maxpool2"
    assert stem["vgg16_to_28x28"]["layers"][-1] == "features.16"
    assert round(stem["vgg16_through_conv3_2_mmac"]) == stem["lecture_slide_mflop"]["vgg16"]
    assert claims["alexnet_fc_params_fraction"].details["fc6"]["params"] == 37_752_832


def test_lecture_figures_that_differ_from_the_counts_are_noted(claims):
    assert "18HWC^2" in claims["vgg_pool_double_macs"].lecture_note
    stem = claims["googlenet_stem_vs_vgg16_macs"]
    # The slide's rows sum to 481 MFLOP with about 3 of pooling: the count must be within that of it.
    assert 475 < stem.details["googlenet_stem_mmac"] < 481
    assert f"{stem.details['googlenet_stem_mmac']:.1f} M MACs" in stem.lecture_note
    assert f"{stem.details['vgg16_through_conv3_2_mmac']:.1f} M MACs through conv3_2" in stem.lecture_note
    # The slide's VGG-16 parameters and memory stop at conv3_2 too: 1.1M and 42.9 MB are what they
    # round from there (the memory without pooling outputs), and the stem's 124K and 7.5 MB match.
    assert round(stem.details["vgg16_through_conv3_2_params"] / 1e6, 1) == 1.1
    assert round(stem.details["vgg16_conv_outputs_through_conv3_2_mib"], 1) == 42.9
    assert round(stem.details["googlenet_stem"]["params"] / 1e3) == 125  # 124K of conv weights, 640 of BatchNorm
    assert round(stem.details["googlenet_stem"]["activation_bytes"] / 2**20, 1) == 7.5
    assert "1,145,408 through conv3_2" in claims["googlenet_stem_vs_vgg16_params"].lecture_note
    assert "42.875 MiB" in claims["googlenet_stem_vs_vgg16_activation_bytes"].lecture_note
    assert [key for key, claim in claims.items() if claim.lecture_note] == [
        "vgg_pool_double_macs", "googlenet_stem_vs_vgg16_macs", "googlenet_stem_vs_vgg16_params",
        "googlenet_stem_vs_vgg16_activation_bytes"]


def test_claims_serialise_to_json(claims):
    fields = {field.name for field in dataclasses.fields(Claim)}
    for claim in claims.values():
        data = json.loads(json.dumps(claim.to_dict()))
        assert set(data) == fields
        assert isinstance(data["predicted"], float)
