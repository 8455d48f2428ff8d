"""The Triton convolution's measured choices kept on disk (cnnfast/triton_kernels/choice_cache.py):
what one process measures, a later one launches without tuning or timing, with the same result;
a stale, unknown or unreadable entry is measured again; nothing is kept where the file is off.
A "later process" here is the same one with every in-memory choice cleared; the clock is a
stand-in, as the interpreter cannot time kernels."""
import json
import warnings

import pytest
import torch

from cnnfast import bench
from cnnfast.analysis import ConvProblem
from cnnfast.triton_kernels import choice_cache, conv2d_pointwise, conv2d_spatial
from cnnfast.triton_kernels import conv2d as conv2d_module
from tests.test_conv2d import Conv, check_conv2d, make_inputs
from tests.test_conv2d_pointwise import check_measured_choice, recorded_launches

# A layer of each TMA kernel, with the name of its config under the interpreter.
LAYERS = {
    "pointwise": (conv2d_pointwise, Conv(2, 40, 5, 7, 24, 1, 1), "tma-32x32x16-g8-w4-s1"),
    "spatial": (conv2d_spatial, Conv(2, 16, 5, 7, 24, 3, 3, padding=1), "tma-2x4x8-16x16-g8-w4-s1"),
}
IMPLICIT_GEMM_NAME = "32x32x16-g4-w4-s1-split1"


@pytest.fixture
def cache_file(monkeypatch, tmp_path):
    path = tmp_path / "cache" / "triton_conv2d.json"
    monkeypatch.setenv("CNNFAST_KERNEL_CACHE", str(path))
    new_process(monkeypatch)
    return path


def new_process(monkeypatch):
    """Clears what this process holds: its measured choices and its copy of the file."""
    monkeypatch.setattr(conv2d_module, "tma_choices", {})
    monkeypatch.setattr(conv2d_module, "chosen_configs", {})
    monkeypatch.setattr(conv2d_module, "recalled", set())
    monkeypatch.setattr(choice_cache, "_contents", {})


def stored_problems(path) -> dict:
    section = json.loads(path.read_text())["cpu"]
    assert section["kernels"] == choice_cache.fingerprint()
    return section["problems"]


def kernel_name(conv: Conv) -> str:
    x, weight, bias, _ = make_inputs(conv, torch.bfloat16)
    problem = ConvProblem(conv.c, conv.h, conv.w, conv.k, conv.r, conv.s, (1, 1), (conv.padding,) * 2)
    return bench.kernel_name("triton", problem, x, weight, bias)


def no_clock(*args, **kwargs):
    raise AssertionError("timed a kernel whose choice was stored")


def check_run(conv: Conv, seed=5):
    check_conv2d(conv, torch.bfloat16, residual=False, relu=True, seed=seed)


@pytest.mark.parametrize("tma_faster", [True, False], ids=["tma_faster", "implicit_gemm_faster"])
@pytest.mark.parametrize("kernel", sorted(LAYERS))
def test_a_later_process_launches_the_stored_choice_without_measuring(monkeypatch, cache_file, kernel, tma_faster):
    module, conv, tma_name = LAYERS[kernel]
    launches = recorded_launches(monkeypatch, module)
    check_measured_choice(monkeypatch, launches, conv, tma_faster, tma_name)
    (problem, stored), = stored_problems(cache_file).items()
    assert stored == {"tma": [module.__name__.rsplit(".")[-1], tma_name] if tma_faster else None,
                      "implicit_gemm": IMPLICIT_GEMM_NAME}
    assert "torch.bfloat16" in problem and "cpu" not in problem  # the device is the section's

    new_process(monkeypatch)
    monkeypatch.setattr(conv2d_module.triton.testing, "do_bench", no_clock)
    for tuner in conv2d_module.conv2d_bias_act_autotuned.values():
        monkeypatch.setattr(tuner, "run", no_clock)
    launched_before = len(launches)
    check_run(conv)
    assert len(launches) - launched_before == int(tma_faster)  # straight to the stored kernel
    assert kernel_name(conv) == (tma_name if tma_faster else IMPLICIT_GEMM_NAME)


def test_a_config_no_longer_among_the_candidates_is_measured_again(monkeypatch, cache_file):
    module, conv, tma_name = LAYERS["spatial"]
    launches = recorded_launches(monkeypatch, module)
    check_measured_choice(monkeypatch, launches, conv, True, tma_name)
    contents = json.loads(cache_file.read_text())
    (problem, stored), = contents["cpu"]["problems"].items()
    stored["tma"][1] = "tma-9x9x9-16x16-g8-w4-s1"
    cache_file.write_text(json.dumps(contents))

    new_process(monkeypatch)
    timed = []
    # The TMA kernel, timed first, is faster again.
    monkeypatch.setattr(conv2d_module.triton.testing, "do_bench", lambda fn, warmup, rep: timed.append(fn) or len(timed))
    check_run(conv)
    assert len(timed) == 2  # TMA kernel and implicit GEMM, timed afresh
    assert stored_problems(cache_file)[problem]["tma"][1] == tma_name


def test_entries_of_other_kernels_are_not_read_and_are_dropped(monkeypatch, cache_file):
    """Entries stored under another fingerprint (other kernel sources or Triton version) are stale."""
    cache_file.parent.mkdir(parents=True)
    stale = {"kernels": "0" * 16, "problems": {"an old problem": {"implicit_gemm": IMPLICIT_GEMM_NAME}}}
    other_gpu = {"kernels": "1" * 16, "problems": {"a problem": {"tma": None}}}
    cache_file.write_text(json.dumps({"cpu": stale, "Another GPU": other_gpu}))
    module, conv, tma_name = LAYERS["pointwise"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    contents = json.loads(cache_file.read_text())
    assert "an old problem" not in contents["cpu"]["problems"] and len(contents["cpu"]["problems"]) == 1
    assert contents["Another GPU"] == other_gpu  # another GPU's entries are its own


def test_an_unreadable_file_is_measured_again_with_a_warning_and_rewritten(monkeypatch, cache_file):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    module, conv, tma_name = LAYERS["pointwise"]
    with pytest.warns(UserWarning, match="cannot read the kernel choices"):
        check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    assert len(stored_problems(cache_file)) == 1


def test_a_file_that_cannot_be_written_leaves_a_warning_and_the_layer_runs(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CNNFAST_KERNEL_CACHE", str(tmp_path / "a-file" / "triton_conv2d.json"))
    new_process(monkeypatch)
    module, conv, tma_name = LAYERS["pointwise"]
    with pytest.warns(UserWarning, match="cannot keep the kernel choices"):
        check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # no file or temporary left behind


@pytest.mark.parametrize("setting", ["", "devnull"])
def test_an_empty_setting_or_devnull_keeps_nothing(monkeypatch, tmp_path, setting):
    monkeypatch.setenv("CNNFAST_KERNEL_CACHE", choice_cache.os.devnull if setting == "devnull" else "")
    monkeypatch.chdir(tmp_path)
    new_process(monkeypatch)
    assert choice_cache.cache_path() is None
    module, conv, tma_name = LAYERS["pointwise"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    assert list(tmp_path.iterdir()) == []
    assert choice_cache.entry(torch.device("cpu"), "any problem") is None


def test_the_interpreter_keeps_nothing(monkeypatch, cache_file):
    """Where kernels cannot be timed nothing was measured, so nothing is stored or read."""
    module, conv, _ = LAYERS["spatial"]
    check_run(conv)
    assert not cache_file.exists()


def test_a_stored_tma_choice_that_fails_to_launch_leaves_a_warning_and_the_implicit_gemm_runs(monkeypatch, cache_file):
    module, conv, tma_name = LAYERS["spatial"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    new_process(monkeypatch)
    monkeypatch.setattr(conv2d_module, "kernels_can_be_timed", lambda: True)
    attempts = []

    def failing_launch(*args, **kwargs):
        attempts.append(kwargs["config"])
        raise RuntimeError("out of resources")

    monkeypatch.setattr(module, "launch", failing_launch)
    with pytest.warns(UserWarning, match="conv2d_spatial failed on .*out of resources.*the implicit GEMM runs"):
        check_run(conv)
    assert [module.config_name(config) for config in attempts] == [tma_name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_run(conv, seed=6)
    assert len(attempts) == 1  # the layer stays on the implicit GEMM
    assert kernel_name(conv) == IMPLICIT_GEMM_NAME


def test_under_the_interpreter_a_tma_launch_error_is_raised(monkeypatch):
    """The tests run the TMA kernels under the interpreter: a kernel that raises there fails them."""
    module, conv, _ = LAYERS["pointwise"]
    monkeypatch.setattr(conv2d_module, "tma_choices", {})

    def failing_launch(*args, **kwargs):
        raise RuntimeError("a kernel bug")

    monkeypatch.setattr(module, "launch", failing_launch)
    with pytest.raises(RuntimeError, match="a kernel bug"):
        check_run(conv)
