import json
import subprocess
import sys
from pathlib import Path

import pytest

import cnnfast
from cnnfast.analysis import analyze_arch
from cnnfast.cli import main
from cnnfast.models import ARCHITECTURES

LAYER_KEYS = {
    "name", "type", "input_shape", "output_shape", "kernel_size", "stride", "padding",
    "params", "macs", "flops", "activation_bytes", "pool_ops",
}
TOTAL_KEYS = {"params", "macs", "flops", "activation_bytes"}


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_prints_every_layer(capsys):
    code, out, _ = run(capsys, "analyze", "alexnet")
    assert code == 0
    assert "alexnet" in out.splitlines()[0]
    for layer in analyze_arch("alexnet").layers:
        assert layer.name in out


def test_analyze_json_has_the_exact_schema(capsys):
    code, out, _ = run(capsys, "analyze", "resnet18", "--input-size", "64", "--batch", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"arch", "input_size", "batch", "layers", "totals"}
    assert (result["arch"], result["input_size"], result["batch"]) == ("resnet18", 64, 2)
    assert result["layers"]
    assert all(set(layer) == LAYER_KEYS for layer in result["layers"])
    assert set(result["totals"]) == TOTAL_KEYS
    assert result["totals"]["macs"] == sum(layer["macs"] for layer in result["layers"])
    assert result["totals"]["flops"] == 2 * result["totals"]["macs"]


def test_unknown_arch_lists_the_valid_names(capsys):
    code, _, err = run(capsys, "analyze", "lenet")
    assert code == 2
    assert "lenet" in err
    for name in ARCHITECTURES:
        assert name in err


def test_too_small_input_names_the_layer(capsys):
    with pytest.raises(ValueError) as expected:
        analyze_arch("alexnet", input_size=8)
    code, out, err = run(capsys, "analyze", "alexnet", "--input-size", "8")
    assert code == 2
    assert out == ""
    assert str(expected.value) in err
    assert any(layer.name in err for layer in analyze_arch("alexnet").layers)


@pytest.mark.parametrize("option", ["--batch", "--input-size"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_non_positive_sizes_are_refused(capsys, option, value):
    code, _, err = run(capsys, "analyze", "vgg16", option, value)
    assert code == 2
    assert option in err


def test_claims_json_is_a_list_of_claims(capsys):
    code, out, _ = run(capsys, "claims", "--json")
    assert code == 0
    claims = json.loads(out)
    assert isinstance(claims, list) and claims
    for claim in claims:
        assert {"key", "title", "statement", "quantity", "predicted", "closed_form"} <= set(claim)


def test_claims_table_shows_every_title(capsys):
    code, out, _ = run(capsys, "claims")
    assert code == 0
    for claim in json.loads(run(capsys, "claims", "--json")[1]):
        assert claim["title"] in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert cnnfast.__version__ in out


def test_missing_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "usage" in err


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "cnnfast.cli", "--help"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for command in ("analyze", "claims", "report"):
        assert command in result.stdout
