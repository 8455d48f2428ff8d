import json

import pytest
import torch
from torch import nn

from cnnfast.analysis.claims import compute_claims
from cnnfast.analysis.counter import ConvProblem
from cnnfast.analysis.measure import SCHEMA, TIME_QUANTITIES, _count, explain, verdict
from cnnfast.cli import main
from cnnfast.roofline import conv_bytes

# Two cheap claims (a few ms a side on a CPU): one of conv stacks, one of AlexNet's pooling and conv layers.
REDUCED = ("bottleneck_vs_basic_macs", "alexnet_pool_ops_vs_conv_macs")
TOP_KEYS = {"schema", "device", "device_type", "dtype", "batch", "torch_version", "timer", "backends", "skipped",
            "empty_op_ms", "ceilings", "verdict_rule", "not_measured", "claims"}
CLAIM_KEYS = {"key", "title", "quantity", "predicted", "pivot", "measured", "measured_range", "verdict", "explanation",
              "cnnfast", "sides"}
CNNFAST_KEYS = {"measured", "measured_range", "verdict", "numerator_ms", "denominator_ms"}
SIDE_KEYS = {"label", "ms", "flops", "bytes", "intensity", "bound_ms", "memory_bound_ms", "bound", "calls"}


@pytest.mark.parametrize("predicted, measured, pivot, expected", [
    (1.389, 1.389 * 1.2, 1.0, "holds"),
    (1.389, 1.389 / 1.24, 1.0, "holds"),
    (0.059, 0.064, 1.0, "holds"),
    (19.5, 3.0, 1.0, "holds in direction"),
    (0.06, 0.3, 1.0, "holds in direction"),
    (0.92, 0.6, 0.5, "holds in direction"),
    (1.389, 0.9, 1.0, "does not hold"),
    (0.92, 0.3, 0.5, "does not hold"),
    (1.0, 1.3, 1.0, "does not hold"),  # "the same compute", measured 30% apart
    (1.0, 1.25, 1.0, "holds"),  # the factor's edges hold
    (1.0, 0.8, 1.0, "holds"),
])
def test_verdict_rule(predicted, measured, pivot, expected):
    assert verdict(predicted, measured, pivot) == expected


def side(label, ms, bound_ms, memory_bound_ms=0.0, calls=1):
    return {"label": label, "ms": ms, "bound_ms": bound_ms, "memory_bound_ms": memory_bound_ms, "calls": calls,
            "intensity": 1.0}


def test_explain_launch_overhead():
    found = explain(10.0, 1.0, side("a", 0.01, 0.001), side("b", 0.01, 0.0001, calls=3), empty_ms=0.004)
    assert found["cause"] == "launch overhead"


def test_explain_memory_boundedness():
    # counted 10, roofline 2 (the denominator is memory-bound), measured 2.5: the roofline explains it
    found = explain(10.0, 2.5, side("a", 10.0, 10.0), side("b", 4.0, 5.0, memory_bound_ms=5.0), empty_ms=1e-4)
    assert found["cause"] == "memory-boundedness"
    assert found["roofline_ratio"] == pytest.approx(2.0)


def test_explain_a_roofline_that_closes_little_of_the_gap_is_not_the_cause():
    # counted 10, measured 2.5, roofline 8 (memory-bound leaves, but a ratio barely moved): neither
    found = explain(10.0, 2.5, side("a", 10.0, 8.0), side("b", 4.0, 1.0, memory_bound_ms=0.5), empty_ms=1e-4)
    assert found["roofline_ratio"] == pytest.approx(8.0)
    assert found["cause"] == "neither"
    # roofline 4.5: a little more than half the gap closed (half, in log scale, is 5)
    found = explain(10.0, 2.5, side("a", 10.0, 4.5), side("b", 4.0, 1.0, memory_bound_ms=0.5), empty_ms=1e-4)
    assert found["cause"] == "memory-boundedness"


def test_explain_neither():
    found = explain(10.0, 2.5, side("a", 10.0, 10.0), side("b", 4.0, 1.0), empty_ms=1e-4)
    assert found["cause"] == "neither"
    # A roofline ratio at the measured one, but from compute-bound layers only: not memory-boundedness.
    found = explain(10.0, 2.5, side("a", 10.0, 2.5), side("b", 4.0, 1.0), empty_ms=1e-4)
    assert (found["roofline_ratio"], found["cause"]) == (pytest.approx(2.5), "neither")


def test_a_fraction_claim_turns_at_one_half_and_a_ratio_at_one():
    from cnnfast.analysis.measure import pivot

    timed = [claim for claim in compute_claims() if claim.quantity in TIME_QUANTITIES]
    assert {claim.key: pivot(claim) for claim in timed if pivot(claim) != 1.0} == {"alexnet_conv_macs_fraction": 0.5}


def test_a_side_is_bound_as_most_of_its_roofline_time_is():
    """A pooling layer moves bytes and does no MACs: memory-bound; a 3x3 conv over 64 channels does
    some 300 FLOPs a byte, past a ridge of 10: compute-bound."""
    from cnnfast.analysis.measure import prepare_side

    ceiling = {"matmul_flop_per_s": 1e12, "copy_bytes_per_s": 1e11}
    pool = prepare_side("pool", [(nn.MaxPool2d(2), (8, 4, 4))], 1, torch.float32, "cpu", ceiling)[0]
    conv = prepare_side("conv", [(nn.Conv2d(64, 64, 3, padding=1), (64, 16, 16))], 1, torch.float32, "cpu", ceiling)[0]
    assert (pool["bound"], conv["bound"]) == ("memory", "compute")
    assert pool["memory_bound_ms"] == pool["bound_ms"] > 0 and conv["memory_bound_ms"] == 0


def test_the_rounds_alternate_their_order(monkeypatch):
    """A B, then B A: a machine that speeds up or slows down through a claim's timing does not
    favour the side timed last."""
    from cnnfast.analysis import measure

    order = []
    monkeypatch.setattr(measure, "time_ms", lambda fn, device, **kwargs: order.append(fn.__defaults__[0]) or 1.0)
    a, b = nn.ReLU(), nn.Tanh()
    x = torch.ones(1, 4, 2, 2)
    measure.time_sides([(a, x)], [(b, x)], "cpu")
    assert order == [a, b, b, a] * (measure.ROUNDS // 2) + [a, b] * (measure.ROUNDS % 2)


@pytest.fixture(scope="module")
def measured():
    from cnnfast.analysis.measure import measure_claims

    return measure_claims(keys=list(REDUCED), device="cpu")


def test_schema_keys(measured):
    assert set(measured) == TOP_KEYS
    assert measured["schema"] == SCHEMA
    assert measured["device_type"] == "cpu" and measured["backends"] == ["torch", "cnnfast"]
    assert measured["skipped"] == {}
    assert set(measured["not_measured"]) == {claim.key for claim in compute_claims()
                                             if claim.quantity not in TIME_QUANTITIES}
    assert len(measured["not_measured"]) == len(compute_claims()) - 11
    for row in measured["claims"]:
        assert set(row) == CLAIM_KEYS and set(row["cnnfast"]) == CNNFAST_KEYS
        low, high = row["measured_range"]
        # The median of the rounds' ratios lies within their range, up to the division's rounding.
        assert 0 < low <= high and low * (1 - 1e-12) <= row["measured"] <= high * (1 + 1e-12)
        assert set(row["sides"]) == {"numerator", "denominator"}
        for figures in row["sides"].values():
            assert set(figures) == SIDE_KEYS


def test_every_time_relevant_claim_has_a_measurement():
    from cnnfast.analysis.measure import _sides

    timed = [claim for claim in compute_claims() if claim.quantity in TIME_QUANTITIES]
    assert len(timed) == 11
    for claim in timed:
        with torch.device("meta"):  # the parts' structure only: no weights to draw
            numerator, denominator = _sides(claim)
        assert numerator[1] and denominator[1]


def test_cli_measure_json_on_a_reduced_set(capsys):
    code = main(["claims", "--measure", "--json", "--only", ",".join(REDUCED)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {row["key"] for row in result["claims"]} == set(REDUCED)
    for row in result["claims"]:
        assert row["sides"]["numerator"]["ms"] > 0 and row["sides"]["denominator"]["ms"] > 0
        assert row["verdict"] in ("holds", "holds in direction", "does not hold")
        assert (row["explanation"] is None) == (row["verdict"] == "holds")


def test_cli_measure_rejects_a_claim_that_is_not_timed(capsys):
    assert main(["claims", "--measure", "--only", "vgg_3x3_vs_5x5_params"]) == 2
    assert "vgg_3x3_vs_5x5_params" in capsys.readouterr().err


def test_report_claims_section_has_predicted_and_measured_columns(tmp_path):
    from cnnfast.report import ReportData, claims_section

    claims = [claim for claim in compute_claims() if claim.key.startswith("bottleneck_vs_basic_")]
    section = claims_section(ReportData(out_dir=tmp_path, analyses={}, claims=claims))
    for text in (section.html, section.markdown):
        assert "Predicted (counted) ratio" in text and "Measured time ratio" in text
        assert "CPU timings" in text or torch.cuda.is_available()
    measured_row = next(line for line in section.markdown.splitlines() if line.startswith("| ResNet: bottleneck")
                        and "| macs |" in line)
    assert any(verdict_text in measured_row for verdict_text in ("holds", "does not hold"))
    assert "not a time" in section.markdown  # the parameters claim is counted, not timed


def test_a_part_in_both_sides_is_timed_once_a_round_so_a_fraction_stays_at_most_one(monkeypatch):
    """A machine that gets faster while the claim is timed: with the conv layers timed once for both
    the numerator and the whole, AlexNet's conv share cannot pass 1 (it did when each side timed its
    parts apart); the rounds alternate their order."""
    from cnnfast.analysis import measure

    clock = iter(range(10**6))

    def drifting(fn, device, **kwargs):  # each call 1% faster than the one before
        return 10.0 * 0.99 ** next(clock)

    monkeypatch.setattr(measure, "time_ms", drifting)
    result = measure.measure_claims(keys=["alexnet_conv_macs_fraction"], device="cpu")
    (row,) = result["claims"]
    assert 0 < row["measured"] <= 1 and 0 < row["cnnfast"]["measured"] <= 1
    assert row["measured_range"][0] < row["measured_range"][1] <= 1


def test_cnnfast_times_each_part_as_optimize_makes_it(monkeypatch):
    from cnnfast.analysis import measure
    from cnnfast.nn import ConvBNReLU

    timed = []

    def recording(fn, device, **kwargs):
        if fn.__defaults__:  # a part's lambda, with its module (not the empty-op timing)
            timed.append(fn.__defaults__[0])
        return 1.0

    monkeypatch.setattr(measure, "time_ms", recording)
    measure.measure_claims(keys=["bottleneck_vs_basic_macs"], device="cpu")
    fused = [module for module in timed if any(isinstance(m, ConvBNReLU) for m in module.modules())]
    plain = [module for module in timed if any(type(m) is torch.nn.Conv2d for m in module.modules())]
    assert len(fused) == len(plain) == 2 * measure.ROUNDS  # two sides, each timed once a round


def test_a_module_run_on_two_shapes_is_timed_on_each(monkeypatch):
    from cnnfast.analysis import measure

    monkeypatch.setattr(measure, "time_ms", lambda fn, device, **kwargs: float(fn.__defaults__[1].numel()))
    relu = torch.nn.ReLU()
    small, large = torch.ones(1, 4, 2, 2), torch.ones(1, 4, 64, 64)
    top, bottom, _ = measure.time_sides([(relu, small), (relu, large)], [(relu, small)], "cpu")
    assert (top, bottom) == (16 + 4 * 64 * 64, 16)


def test_a_sides_conv_bytes_are_the_rooflines():
    """A 1x1 stride-2 conv reads a quarter of its input: the claims' bound and the roofline count
    its traffic alike (the whole input was counted here, twice the roofline's figure)."""
    ceiling = {"matmul_flop_per_s": 1e12, "copy_bytes_per_s": 1e11}
    conv = nn.Conv2d(64, 128, 1, 2, bias=False)
    side = _count(conv, torch.randn(1, 64, 56, 56), ceiling)
    assert side["bytes"] == conv_bytes(ConvProblem(64, 56, 56, 128, 1, 1, (2, 2), (0, 0)), 1, 4) == 634_880
    pool = nn.MaxPool2d(2)
    assert _count(pool, torch.randn(1, 8, 4, 4), ceiling)["bytes"] == (8 * 16 + 8 * 4) * 4  # input and output
    # Any other layer: its input, output, weight and bias, each once.
    assert _count(nn.Linear(8, 4), torch.randn(1, 8), ceiling)["bytes"] == (8 + 4 + 4 * 8 + 4) * 4
