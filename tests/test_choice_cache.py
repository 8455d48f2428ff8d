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
from tests.test_conv2d import Conv, check_conv2d, make_inputs, run_conv2d
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
    monkeypatch.setattr(conv2d_module, "tma_failed", set())
    monkeypatch.setattr(conv2d_module, "launched", set())
    monkeypatch.setattr(choice_cache, "_contents", {})


def stand_in_clock(monkeypatch) -> list:
    """Kernels can be timed, and the first one timed (the TMA kernel) is the faster; returns the
    functions timed."""
    timed = []
    monkeypatch.setattr(conv2d_module, "kernels_can_be_timed", lambda: True)
    monkeypatch.setattr(conv2d_module.triton.testing, "do_bench",
                        lambda fn, warmup, rep, return_mode: timed.append(fn) or len(timed))
    return timed


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


@pytest.mark.parametrize("kernel", sorted(LAYERS))
def test_a_stored_choice_is_not_first_loaded_inside_a_cuda_graph_capture(monkeypatch, cache_file, kernel):
    """A later process whose first call of a layer comes while a CUDA graph is captured would
    compile and load the stored choice's kernel there, which CUDA forbids (the capture breaks): the
    call is refused with what to do, and the layer is captured once it has run (with its epilogue)."""
    module, conv, tma_name = LAYERS[kernel]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    new_process(monkeypatch)
    monkeypatch.setattr(conv2d_module, "capturing", lambda x: True)
    refusal = rf"\({conv2d_module.kernel_module_name(module)}\) has not run in this process with these operands"
    with pytest.raises(RuntimeError, match=refusal + r".*run the model \(or the op\) once"):
        check_run(conv)
    monkeypatch.setattr(conv2d_module, "capturing", lambda x: False)
    check_run(conv)
    monkeypatch.setattr(conv2d_module, "capturing", lambda x: True)
    check_run(conv, seed=6)
    with pytest.raises(RuntimeError, match="has not run in this process"):  # without ReLU: another kernel
        check_conv2d(conv, torch.bfloat16, residual=False, relu=False)


def test_a_layer_run_on_the_other_kernel_is_refused_inside_a_capture(monkeypatch, cache_file):
    """Which kernel runs depends on the operands' layout, which the layer's key leaves out: a layer
    first run with an NCHW input (which the implicit GEMM takes) has not loaded the TMA kernel that a
    channels_last call, its stored choice, would launch inside the capture."""
    module, conv, tma_name = LAYERS["pointwise"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    new_process(monkeypatch)
    x, weight, bias, _ = make_inputs(conv, torch.bfloat16, residual=False)
    run_conv2d(conv, x.contiguous(), weight, bias, relu=True)
    monkeypatch.setattr(conv2d_module, "capturing", lambda x: True)
    with pytest.raises(RuntimeError, match=r"\(conv2d_pointwise\) has not run in this process with these operands"):
        run_conv2d(conv, x, weight, bias, relu=True)
    run_conv2d(conv, x.contiguous(), weight, bias, relu=True)  # the kernel that ran outside the capture


def test_a_config_no_longer_among_the_candidates_is_measured_again(monkeypatch, cache_file):
    module, conv, tma_name = LAYERS["spatial"]
    launches = recorded_launches(monkeypatch, module)
    check_measured_choice(monkeypatch, launches, conv, True, tma_name)
    contents = json.loads(cache_file.read_text())
    (problem, stored), = contents["cpu"]["problems"].items()
    stored["tma"][1] = "tma-9x9x9-16x16-g8-w4-s1"
    cache_file.write_text(json.dumps(contents))

    new_process(monkeypatch)
    timed = stand_in_clock(monkeypatch)
    check_run(conv)
    assert len(timed) == 2  # TMA kernel and implicit GEMM, timed afresh
    assert stored_problems(cache_file)[problem]["tma"][1] == tma_name


def test_entries_of_other_kernels_are_not_read_and_are_dropped(monkeypatch, cache_file):
    """Entries stored under another fingerprint (other kernel sources or Triton version) are stale."""
    module, conv, tma_name = LAYERS["pointwise"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    contents = json.loads(cache_file.read_text())
    contents["cpu"]["kernels"] = "0" * 16
    contents["cpu"]["problems"]["an old problem"] = {"tma": None}
    other_gpu = {"kernels": "1" * 16, "problems": {"a problem": {"tma": None}}}
    contents["Another GPU"] = other_gpu
    cache_file.write_text(json.dumps(contents))

    new_process(monkeypatch)
    timed = stand_in_clock(monkeypatch)
    check_run(conv)
    assert len(timed) == 2  # the stale entry of this very problem was not read
    contents = json.loads(cache_file.read_text())
    assert contents["cpu"]["kernels"] == choice_cache.fingerprint()
    assert "an old problem" not in contents["cpu"]["problems"] and len(contents["cpu"]["problems"]) == 1
    assert contents["Another GPU"] == other_gpu  # another GPU's entries are its own


MALFORMED = {
    "tma-a-string": lambda problem: {"cpu": {"problems": {problem: {"tma": "conv2d_pointwise"}}}},
    "tma-three-items": lambda problem: {"cpu": {"problems": {problem: {"tma": ["a", "b", "c"]}}}},
    "tma-a-number": lambda problem: {"cpu": {"problems": {problem: {"tma": 5}}}},
    "implicit-gemm-a-list": lambda problem: {"cpu": {"problems": {problem: {"implicit_gemm": [1]}}}},
    "entry-a-list": lambda problem: {"cpu": {"problems": {problem: [None]}}},
    "problems-a-list": lambda problem: {"cpu": {"problems": [problem]}},
    "no-problems": lambda problem: {"cpu": {}},
    "section-a-string": lambda problem: {"cpu": "H200"},
    "file-a-list": lambda problem: [problem],
}


@pytest.mark.parametrize("malformed", sorted(MALFORMED))
def test_a_malformed_entry_or_file_is_measured_again(monkeypatch, cache_file, malformed):
    """Valid JSON of another shape (a hand edit, a foreign file) is never launched from."""
    module, conv, tma_name = LAYERS["pointwise"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    (problem, _), = stored_problems(cache_file).items()
    contents = MALFORMED[malformed](problem)
    if isinstance(contents, dict) and isinstance(contents["cpu"], dict):
        contents["cpu"]["kernels"] = choice_cache.fingerprint()
    cache_file.write_text(json.dumps(contents))

    new_process(monkeypatch)
    timed = stand_in_clock(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a list for a file is also reported as unreadable
        check_run(conv)
    assert len(timed) == 2
    assert stored_problems(cache_file)[problem] == {"tma": ["conv2d_pointwise", tma_name],
                                                    "implicit_gemm": IMPLICIT_GEMM_NAME}


def test_a_tma_kernel_that_fails_to_tune_is_not_stored_as_beaten(monkeypatch, cache_file):
    """A failure may be this process's own (out of memory while tuning): later processes try again."""
    module, conv, _ = LAYERS["spatial"]
    stand_in_clock(monkeypatch)

    def failing_launch(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(module, "launch", failing_launch)
    with pytest.warns(UserWarning, match="out of memory"):
        check_run(conv)
    assert list(stored_problems(cache_file).values()) == [{"implicit_gemm": IMPLICIT_GEMM_NAME}]


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


@pytest.mark.parametrize("conv", [LAYERS["spatial"][1], Conv(1, 3, 5, 5, 8, 3, 3, padding=1)],
                         ids=["tma-kernel", "implicit-gemm-only"])
def test_the_interpreter_neither_reads_nor_stores(monkeypatch, cache_file, conv):
    """Where kernels cannot be timed nothing was measured, so nothing is stored or read."""
    calls = []
    monkeypatch.setattr(choice_cache, "entry", lambda *args: calls.append(args))
    monkeypatch.setattr(choice_cache, "store", lambda *args: calls.append(args))
    check_run(conv)
    assert calls == []


def test_no_home_directory_keeps_nothing(monkeypatch):
    monkeypatch.delenv("CNNFAST_KERNEL_CACHE")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(choice_cache.Path, "home", no_home)
    assert choice_cache.cache_path() is None


def test_the_default_file_is_in_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("CNNFAST_KERNEL_CACHE")
    monkeypatch.setattr(choice_cache.Path, "home", lambda: tmp_path)
    assert choice_cache.cache_path() == tmp_path / ".cache" / "cnnfast" / "triton_conv2d.json"


def test_the_file_is_readable_by_all_as_a_plain_write_leaves_it(monkeypatch, cache_file):
    module, conv, tma_name = LAYERS["pointwise"]
    check_measured_choice(monkeypatch, recorded_launches(monkeypatch, module), conv, True, tma_name)
    assert cache_file.stat().st_mode & 0o777 == 0o644


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
