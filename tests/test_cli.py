import json
import subprocess
import sys
from pathlib import Path

import pytest

import cnnfast
from cnnfast.analysis import analyze_arch
from cnnfast.cli import main
from cnnfast.models import ARCHITECTURE_NOTES, ARCHITECTURES

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
@pytest.mark.parametrize("value", ["0", "-3", "two", str(2**63)])
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


@pytest.mark.parametrize("argv, message", [
    (("claims", "--only", "gap_head_vs_fc_head_macs"), "--only applies with --measure only"),
    (("claims", "--batch", "8", "--dtype", "fp32"), "--batch, --dtype apply with --measure only"),
    (("claims", "--measure", "--only", ","), "expected comma-separated claim keys, got ','"),
    (("claims", "--measure", "--only", "bogus"), "unknown claims: bogus (the claims: vgg_3x3_vs_5x5_params"),
    (("claims", "--measure", "--only", "vgg_3x3_vs_5x5_params"), "not time-relevant claims"),
], ids=["only-without-measure", "batch-dtype-without-measure", "no-keys", "unknown-key", "untimed-key"])
def test_claims_options_that_cannot_apply_are_refused(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and not out


@pytest.fixture
def measuring_fails(monkeypatch):
    """bench's measurement replaced by a failure: a command must refuse its output before it."""
    import cnnfast.bench

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured before checking the output")

    monkeypatch.setattr(cnnfast.bench, "run_bench", must_not_measure)


@pytest.mark.parametrize("command", [("bench", "--json"), ("tune", "--json"), ("roofline", "--out"), ("report", "--out")])
def test_an_output_that_cannot_be_written_is_refused_before_measuring(capsys, tmp_path, monkeypatch, measuring_fails,
                                                                       command):
    monkeypatch.setattr(cnnfast.bench, "default_device", lambda: __import__("torch").device("cuda"))  # tune's check
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    name, option = command
    arch = () if name == "report" else ("resnet18",)
    dry_run = ("--dry-run",) if name == "tune" else ()  # the tests' tuning table is none, which tune refuses too
    code, _, err = run(capsys, name, *arch, *dry_run, option, str(blocker / "inside"))
    assert code == 2 and f"cnnfast {name}: error: " in err and str(blocker / "inside") in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [("bench", "resnet18", "--json", "/proc/cnnfast.json"),
                                  ("roofline", "resnet18", "--out", "/proc/self"),
                                  ("bench", "resnet18", "--json", ""), ("report", "--out", ""),
                                  ("bench", "resnet18", "--json", "x" * 300 + ".json"),
                                  ("roofline", "resnet18", "--out", "x" * 300)],
                         ids=["json-in-proc", "out-in-proc", "empty-json", "empty-out", "json-name-too-long",
                              "out-name-too-long"])
def test_an_output_that_only_writing_finds_unwritable_is_refused_before_measuring(capsys, measuring_fails, argv):
    """os.access says yes to root and on /proc; the check writes instead. An empty name, or one too
    long for the filesystem, is refused."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"cnnfast {argv[0]}: error: " in err
    assert (f"{argv[-2]} needs a" in err) if argv[-1] == "" else (argv[-1] in err)


def test_the_output_check_leaves_pipes_and_links_as_they_are(tmp_path):
    """A named pipe is not opened by the check (with no reader that blocks; with one, its input
    would end before the JSON comes); a link to a file not yet there stays a link, with no file
    made at its target."""
    import os
    import threading

    from cnnfast.cli import output_problem

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    answers = []
    check = threading.Thread(target=lambda: answers.append(output_problem(json_file=str(pipe))), daemon=True)
    check.start()
    check.join(timeout=10)
    assert answers == [None]
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "sub" / "target.json")
    assert output_problem(json_file=str(link)) is None
    assert link.is_symlink() and not (tmp_path / "sub" / "target.json").exists()
    assert sorted(path.name for path in (tmp_path / "sub").iterdir()) == []
    # A link into a directory that is not there cannot be written through: refused before measuring.
    (tmp_path / "nowhere.json").symlink_to(tmp_path / "missing" / "out.json")
    assert "No such file or directory" in output_problem(json_file=str(tmp_path / "nowhere.json"))


def test_a_json_that_fails_when_written_is_an_error_not_a_traceback(capsys, tmp_path):
    from argparse import Namespace

    from cnnfast.cli import write_result

    code = write_result(Namespace(command="bench", json=str(tmp_path)), {"layers": []})
    captured = capsys.readouterr()
    assert code == 2 and f"cnnfast bench: error: cannot write --json {tmp_path}: " in captured.err


@pytest.mark.parametrize("command", ["bench", "roofline"])
def test_an_input_too_small_for_the_architecture_is_an_error_not_a_traceback(capsys, tmp_path, command):
    code, _, err = run(capsys, command, "alexnet", "--input-size", "10", "--backends", "torch",
                       *(("--out", str(tmp_path)) if command == "roofline" else ()))
    assert code == 2
    assert err.startswith(f"cnnfast {command}: error: alexnet at input 10x10: layer 'features.2'")


@pytest.mark.parametrize("size", [("--input-size", "99999999999"), ("--batch", str(2**62)), ("--batch", str(10**13))],
                         ids=["input-size", "input-batch", "layer-output-batch"])
def test_an_input_too_large_to_count_is_an_error_not_a_traceback(capsys, size):
    # 10^13 images fit the input tensor; conv1's 64-channel output is the first that overflows.
    code, out, err = run(capsys, "analyze", "vgg16", *size)
    assert code == 2 and out == ""
    assert err.startswith("cnnfast analyze: error: vgg16 at input ") and "is too large to count" in err
    assert "too small" not in err


@pytest.mark.parametrize("command", ["bench", "roofline"])
def test_feature_maps_larger_than_the_memory_are_refused_before_anything_is_drawn(capsys, tmp_path, command):
    from cnnfast.bench import default_device, device_memory_bytes

    # conv1's input alone is more than the memory in float32, and its input, output and residual in bfloat16.
    batch = device_memory_bytes(default_device()) // (3 * 224 * 224 * 4) + 1
    code, _, err = run(capsys, command, "alexnet", "--batch", str(batch), "--backends", "torch", "--max-layers", "1",
                       *(("--out", str(tmp_path)) if command == "roofline" else ()))
    assert code == 2
    assert err.startswith(f"cnnfast {command}: error: at batch {batch}, layer features.0's input, output and residual")
    assert "use a smaller --batch or --input-size" in err


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    result = subprocess.run(f"{sys.executable} -m cnnfast.cli analyze resnet152 --json | head -c 10", shell=True,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.stdout == '{\n  "arch"' and "Traceback" not in result.stderr


def test_analyze_notes_where_the_model_is_not_the_lectures(capsys):
    code, out, _ = run(capsys, "analyze", "googlenet")
    assert code == 0 and out.splitlines()[1] == f"note: {ARCHITECTURE_NOTES['googlenet']}"
    code, out, _ = run(capsys, "analyze", "resnet18")
    assert "note:" not in out
