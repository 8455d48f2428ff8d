"""`cnnfast bench` and `cnnfast roofline` on the CPU: skipped backends with reasons, the JSON schemas, the chart."""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cnnfast import backends
from cnnfast.analysis.counter import ConvProblem
from cnnfast.bench import Progress, clock, progress_text
from cnnfast.cli import main

SMALL = ("resnet18", "--batch", "1", "--input-size", "32", "--max-layers", "2")
BENCH_KEYS = {"schema", "arch", "batch", "input_size", "dtype", "tf32", "device", "device_type", "torch_version",
              "timer", "backends", "skipped", "layers", "end_to_end"}
LAYER_KEYS = {"layer", "layers", "problem", "flops", "bytes", "results", "skipped"}
PROBLEM_KEYS = {"C", "H", "W", "K", "R", "S", "stride", "padding", "epilogue"}
RESULT_KEYS = {"ms", "flop_per_s", "bytes_per_s", "speedup_vs_torch", "kernel"}
END_TO_END_KEYS = {"variant", "backend", "ms", "images_per_s", "speedup_vs_eager"}


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path / "cache"))


def test_bench_times_what_runs_here_and_says_why_the_rest_is_skipped(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "bench", *SMALL, "--layers", "--json", str(path))
    assert code == 0
    result = json.loads(path.read_text())
    assert set(result) == BENCH_KEYS
    assert result["schema"] == "cnnfast.bench/4" and result["tf32"] is False  # a CPU computes IEEE float32
    assert (result["arch"], result["batch"], result["input_size"]) == ("resnet18", 1, 32)
    assert (result["dtype"], result["device_type"]) == ("fp32", "cpu")
    assert result["backends"] == ["torch", "eager", "torch_folded", "compile"]
    assert set(result["skipped"]) == {"triton", "cuda", "torch_triton", "cudnn_fused"}
    assert all("CUDA device" in result["skipped"][backend] for backend in result["skipped"])
    assert [layer["layer"] for layer in result["layers"]] == ["conv1", "layer1.0.conv1"]
    for layer in result["layers"]:
        assert set(layer) == LAYER_KEYS and set(layer["problem"]) == PROBLEM_KEYS
        assert layer["problem"]["epilogue"] == "relu" and layer["skipped"] == {}
        assert set(layer["results"]) == set(result["backends"])
        for figures in layer["results"].values():
            assert set(figures) == RESULT_KEYS and figures["ms"] > 0 and figures["kernel"] is None
        assert layer["results"]["torch"]["speedup_vs_torch"] == 1
    # Each block's conv2 has the same geometry but adds the shortcut: a layer of its own.
    assert layer["layers"] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert [row["variant"] for row in result["end_to_end"]] == ["eager", "cnnfast"]
    assert all(set(row) == END_TO_END_KEYS and row["images_per_s"] > 0 for row in result["end_to_end"])
    assert "CPU timings" in out
    assert "skipped triton: needs a CUDA device" in out and "skipped cuda:" in out
    assert "layer1.0.conv1" in out  # --layers: the per-layer table
    # Progress on stderr, a line per step off a terminal: two layers, then the whole model.
    assert "[2/3] layer1.0.conv1: torch, eager, torch_folded, compile (" in err
    assert "[3/3] end to end: resnet18 eager and cnnfast.optimize" in err and "\r" not in err


def test_bench_prints_only_the_summary_without_layers(capsys):
    code, out, _ = run(capsys, "bench", *SMALL, "--backends", "torch")
    assert code == 0
    assert "conv ms (all calls)" in out and "images/s" in out
    assert "layer1.0.conv1" not in out


def test_a_backend_named_twice_is_measured_once():
    from cnnfast.cli import backend_list

    assert backend_list("torch, triton,torch,,triton") == ["torch", "triton"]


def test_unknown_backend_is_a_usage_error(capsys):
    code, _, err = run(capsys, "bench", "resnet18", "--backends", "torch,cudnn")
    assert code == 2
    assert "cudnn" in err
    code, _, err = run(capsys, "bench", "resnet18", "--backends", " , ")  # names no backend at all
    assert code == 2 and "expected a comma-separated list" in err


def test_roofline_writes_the_chart_and_json(capsys, tmp_path):
    out_dir = tmp_path / "roofline"
    code, out, _ = run(capsys, "roofline", *SMALL, "--backends", "torch,torch_folded,triton", "--out", str(out_dir))
    assert code == 0
    assert (out_dir / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out_dir / "roofline.json").read_text())
    assert data["schema"] == "cnnfast.roofline/5"
    assert [(p["layer"], p["backend"]) for p in data["points"]] == [
        ("conv1", "torch"), ("conv1", "torch_folded"), ("layer1.0.conv1", "torch"), ("layer1.0.conv1", "torch_folded"),
    ]
    assert all(p["bound"] in ("memory", "compute") for p in data["points"])
    assert "skipped triton" in out and "% of bound" in out and "roofline.png" in out


def test_roofline_with_nothing_timed_is_an_error_that_says_why(capsys, tmp_path, monkeypatch):
    """A backend that fails on every layer (torch.compile without a C++ compiler) leaves no point
    to plot: an error naming the reason, not an empty chart and exit 0."""
    from cnnfast import bench

    def layer_function(backend, *args):
        def fails():
            raise torch._dynamo.exc.BackendCompilerFailed(None, RuntimeError("InvalidCxxCompiler: no compiler"), None)
        return fails

    monkeypatch.setattr(bench, "layer_function", layer_function)
    out_dir = tmp_path / "roofline"
    code, _, err = run(capsys, "roofline", *SMALL, "--backends", "compile", "--out", str(out_dir))
    assert code == 2 and "cnnfast roofline: error: no layer was timed on any backend asked for; " in err
    assert ("skipped compile on conv1, layer1.0.conv1: torch.compile failed here: RuntimeError: InvalidCxxCompiler"
            in err)
    assert not (out_dir / "roofline.json").exists() and not (out_dir / "roofline.png").exists()


def expected_epilogue(arch: str, name: str) -> str:
    """What a conv of arch does after its bias in the fused model, from its name."""
    last_conv = "conv3" if arch in ("resnet50", "resnet101", "resnet152") else "conv2"
    if arch.startswith("resnet") and name.startswith("layer"):
        return {"downsample": "none", last_conv: "residual+relu"}.get(name.rsplit(".", 1)[1], "relu")
    return "relu"


@pytest.mark.parametrize("arch", ["alexnet", "vgg16_bn", "googlenet", "resnet18", "resnet50"])
def test_bench_layers_are_the_fused_models_convolutions(arch):
    """conv_layers: every conv call of the model once, under the fused model's name, with the
    epilogue the fused model runs it with; the geometries are the analysis'."""
    from cnnfast.analysis import analyze_arch, conv_problems
    from cnnfast.bench import conv_layers

    layers = conv_layers(arch)
    names = [name for layer_names in layers.values() for name in layer_names]
    analysis = analyze_arch(arch)
    assert len(names) == len(set(names)) == len(analysis.of_type("conv"))
    assert {problem for problem, _ in layers} == set(conv_problems(analysis))
    for (_, epilogue), layer_names in layers.items():
        assert {expected_epilogue(arch, name) for name in layer_names} == {epilogue}, layer_names
    if arch == "resnet50":  # conv3 and the projection of layer1's first block share a geometry
        assert len(layers) == len(conv_problems(analysis)) + 1
        assert ["layer1.0.downsample"] in layers.values()


def test_bench_layers_skip_a_backend_that_cannot_run_the_epilogue():
    """cudnn_fused on a layer without ReLU: listed in the layer's skipped, not timed (on the CPU it
    could not run at all, so timing it would fail the test)."""
    from cnnfast.bench import bench_layers

    problem = ConvProblem(C=8, H=6, W=6, K=16, R=1, S=1, stride=(2, 2), padding=(0, 0))
    (row,) = bench_layers({(problem, "none"): ["layer1.0.downsample"]}, 1, torch.float32, torch.device("cpu"),
                          ["torch", "cudnn_fused"])
    assert list(row["results"]) == ["torch"]
    assert row["skipped"] == {"cudnn_fused": "cuDNN's fused convolution ends in a ReLU; this layer has none"}
    assert row["problem"]["epilogue"] == "none"


def test_a_layers_figures_are_its_flops_bytes_and_time(monkeypatch):
    """Each backend's rate is the layer's FLOPs and bytes (a residual layer's shortcut counted) over
    its own time, its speedup the torch backend's time over its own; the whole model's speedup is
    eager's time over its own."""
    from cnnfast import bench
    from cnnfast.roofline import conv_bytes, conv_flops

    times = iter([2.0, 0.5, 4.0])
    monkeypatch.setattr(bench, "time_ms", lambda fn, device: next(times))
    problem = ConvProblem(C=4, H=6, W=6, K=8, R=3, S=3, stride=(1, 1), padding=(1, 1))
    (row,) = bench.bench_layers({(problem, "residual+relu"): ["layer1.0.conv2"]}, 2, torch.float32,
                                torch.device("cpu"), ["torch", "torch_folded", "eager"])
    flops, traffic = conv_flops(problem, 2), conv_bytes(problem, 2, 4, residual=True)
    assert (row["flops"], row["bytes"]) == (flops, traffic) and traffic > conv_bytes(problem, 2, 4)
    for backend, ms, speedup in (("torch", 2.0, 1.0), ("torch_folded", 0.5, 4.0), ("eager", 4.0, 0.5)):
        result = row["results"][backend]
        assert (result["ms"], result["speedup_vs_torch"]) == (ms, speedup)
        assert result["flop_per_s"] == pytest.approx(flops / (ms * 1e-3))
        assert result["bytes_per_s"] == pytest.approx(traffic / (ms * 1e-3))
    times = iter([3.0, 1.5])
    eager, fused = bench.bench_model("resnet18", 2, torch.float32, torch.device("cpu"), 32)
    assert [(row["ms"], row["speedup_vs_eager"]) for row in (eager, fused)] == [(3.0, 1.0), (1.5, 2.0)]
    assert fused["images_per_s"] == pytest.approx(2 / 1.5e-3)


def test_which_architectures_have_batch_norm():
    from cnnfast.bench import has_batch_norm
    from cnnfast.models import ARCHITECTURES

    without = {"alexnet", "zfnet", "vgg16", "vgg19"}
    assert {arch for arch in ARCHITECTURES if not has_batch_norm(arch)} == without


@pytest.mark.parametrize("batch_norm", [True, False])
def test_eager_runs_the_layer_as_the_model_does(monkeypatch, batch_norm):
    """eager: conv, BatchNorm, epilogue in a model with BatchNorm; the conv with its bias and the
    epilogue in one without (no BatchNorm the model does not have); run_bench says which."""
    from cnnfast import bench

    outputs, eager_calls = [], []

    def time_ms(fn, device):  # keeps what each backend computed
        outputs.append(fn())
        return 1.0

    monkeypatch.setattr(bench, "time_ms", time_ms)
    real_eager_function = bench.eager_function
    monkeypatch.setattr(bench, "eager_function", lambda *args: eager_calls.append(args) or real_eager_function(*args))
    problem = ConvProblem(C=4, H=6, W=6, K=8, R=3, S=3, stride=(1, 1), padding=(1, 1))
    bench.bench_layers({(problem, "relu"): ["features.0"]}, 1, torch.float32, torch.device("cpu"),
                       ["eager", "torch_folded"], batch_norm=batch_norm)
    assert len(eager_calls) == batch_norm
    if batch_norm:  # the unfolded BatchNorm rounds differently from the folded weight
        torch.testing.assert_close(outputs[0], outputs[1])
    else:
        assert torch.equal(outputs[0], outputs[1])

    seen = []
    monkeypatch.setattr(bench, "bench_layers", lambda *args: seen.append(args[-1]) or [])
    for arch in ("alexnet", "vgg16_bn"):
        bench.run_bench(arch, backends=["eager"], device="cpu", max_layers=1, end_to_end=False)
    assert seen == [False, True]


def test_a_torch_compile_that_cannot_build_here_is_skipped_with_its_reason(monkeypatch):
    """torch.compile depends on the machine's toolchain: where it fails, its layers are listed as
    skipped with PyTorch's error, once tried, and the other backends are timed; any other backend's
    failure is raised."""
    from cnnfast import bench

    calls = []
    real_layer_function = bench.layer_function

    def layer_function(backend, *args):
        if backend in ("compile", "torch_folded"):
            def fails():
                calls.append(backend)
                if backend == "torch_folded":
                    raise RuntimeError("a failure of one of cnnfast's own paths")
                inner = RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
                raise torch._dynamo.exc.BackendCompilerFailed(None, inner, None)
            return fails
        return real_layer_function(backend, *args)

    monkeypatch.setattr(bench, "layer_function", layer_function)
    problems = {(ConvProblem(C=8, H=6, W=6, K=16, R=1, S=1, stride=(1, 1), padding=(0, 0)), "relu"): ["a"],
                (ConvProblem(C=8, H=6, W=6, K=8, R=1, S=1, stride=(1, 1), padding=(0, 0)), "relu"): ["b"]}
    rows = bench.bench_layers(problems, 1, torch.float32, torch.device("cpu"), ["torch", "compile"])
    reason = "torch.compile failed here: RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert [row["skipped"] for row in rows] == [{"compile": reason}] * 2 and calls == ["compile"]
    assert all(list(row["results"]) == ["torch"] for row in rows)
    with pytest.raises(RuntimeError, match="one of cnnfast's own paths"):
        bench.bench_layers(problems, 1, torch.float32, torch.device("cpu"), ["torch_folded"])


def test_the_summary_speedup_weighs_each_layer_by_its_calls_as_the_rest_of_its_row():
    """A layer the model calls three times counts three times, as in the row's total ms: 7 ms of
    torch over 4 ms is 1.75 (the unweighted geometric mean of the layers' 4 and 1 would say 2)."""
    from cnnfast.bench import summary_rows

    def layer(uses, torch_ms, triton_ms):
        return {"layers": [f"l{i}" for i in range(uses)], "flops": 1e9,
                "results": {"torch": {"ms": torch_ms, "speedup_vs_torch": 1.0},
                            "triton": {"ms": triton_ms, "speedup_vs_torch": torch_ms / triton_ms}}}

    result = {"device_type": "cuda", "backends": ["torch", "triton"], "layers": [layer(1, 4.0, 1.0), layer(3, 1.0, 1.0)]}
    _, rows = summary_rows(result)
    assert rows[1] == ("triton", "4.000", "1.0", "1.75") and rows[0][3] == "1.00"


def test_a_backend_that_cannot_run_some_layers_is_summed_over_the_rest():
    from cnnfast.bench import skipped_lines, summary_rows
    from cnnfast.cli import tune_table

    def layer(name, epilogue, times):
        return {"layer": name, "layers": [name, name + "'"], "flops": 2e9, "bytes": 1e6,
                "problem": {"C": 64, "H": 56, "W": 56, "K": 256, "R": 1, "S": 1, "stride": [1, 1], "padding": [0, 0],
                            "epilogue": epilogue},
                "results": {backend: {"ms": ms, "speedup_vs_torch": times["torch"] / ms, "kernel": None}
                            for backend, ms in times.items()},
                "skipped": {} if "cudnn_fused" in times else {"cudnn_fused": "ends in a ReLU; this layer has none"}}

    result = {"device_type": "cuda", "backends": ["torch", "cudnn_fused"], "skipped": {"cuda": "not built"},
              "layers": [layer("conv3", "residual+relu", {"torch": 2.0, "cudnn_fused": 1.0}),
                         layer("downsample", "none", {"torch": 1.0})]}
    _, rows = summary_rows(result)
    assert rows[0] == ("torch", "6.000", "1.3", "1.00")
    assert rows[1] == ("cudnn_fused", "2.000 (1 of 2 layers)", "2.0", "2.00")
    none_timed = dict(result, backends=["torch", "compile"])
    assert summary_rows(none_timed)[1][1] == ("compile", "- (0 of 2 layers)", "-", "-")
    assert skipped_lines(result) == ["skipped cuda: not built",
                                     "skipped cudnn_fused on downsample: ends in a ReLU; this layer has none"]
    _, rows = tune_table(result)
    assert [row[2:5] for row in rows] == [("2.000", "1.000", "cudnn_fused"), ("1.000", "-", "torch")]


@pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton backend on CPU tensors")
@pytest.mark.parametrize("epilogue", ["relu", "residual+relu", "none"])
def test_conv_benchmark_layers_compute_the_same_layer(epilogue):
    """bench/bench_conv2d.py's callables, on the CPU: the BN-folded paths (eager_folded, torch,
    triton) match conv -> BN [-> + residual] [-> ReLU] in float64, and cudnn is the bare
    convolution of the same input."""
    from bench.bench_conv2d import layer_fn, layer_tensors
    from cnnfast.testing import assert_close_to_reference

    problem = ConvProblem(C=16, H=6, W=5, K=24, R=3, S=3, stride=(2, 2), padding=(1, 1))
    outputs = {backend: layer_fn(backend, 2, problem, epilogue, device="cpu")()
               for backend in ("cudnn", "eager", "eager_folded", "torch", "triton")}
    x, raw_weight, bn, _, _, residual = layer_tensors(2, problem, epilogue, device="cpu")
    conv = F.conv2d(x.double(), raw_weight.double(), None, problem.stride, problem.padding)
    assert_close_to_reference(outputs["cudnn"], conv, "conv")
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    shift = bn.bias.double() - bn.running_mean.double() * scale
    reference = conv * scale[:, None, None] + shift[:, None, None]
    assert (residual is not None) == (epilogue == "residual+relu")
    reference = reference + residual.double() if residual is not None else reference
    assert (reference < 0).any()  # a ReLU has work to do
    reference = torch.relu(reference) if epilogue.endswith("relu") else reference
    for backend in ("eager", "eager_folded", "torch", "triton"):
        assert_close_to_reference(outputs[backend], reference, "conv")
    # A model without BatchNorm (VGG-16): eager is the conv with its bias, then the epilogue, and
    # does no BatchNorm's work.
    no_bn = layer_fn("eager", 2, problem, epilogue, device="cpu", batch_norm=False)()
    assert torch.equal(no_bn, outputs["eager_folded"])


def test_conv_benchmark_counts_the_shortcut_only_where_a_backend_reads_it():
    from bench.bench_conv2d import case_traffic

    problem = ConvProblem(C=64, H=56, W=56, K=256, R=1, S=1, stride=(1, 1), padding=(0, 0))
    output_bytes = 2 * 256 * 256 * 56 * 56
    fused = case_traffic(problem, 256, "residual+relu", "triton")
    assert fused - case_traffic(problem, 256, "residual+relu", "cudnn") == output_bytes
    assert case_traffic(problem, 256, "relu", "triton") == case_traffic(problem, 256, "relu", "cudnn")


@pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton kernel on CPU tensors")
def test_kernel_name_says_what_ran(monkeypatch):
    """The "kernel" of a layer's result: the config the Triton autotuner chose (once the layer has
    run), the tile of torch_triton's epilogue (likewise), and the CUTLASS kernel the CUDA backend
    runs: the fprop 64-wide for K = 64 and 128-wide above, and a 1x1 stride-1 layer with K > 64 as a
    GEMM."""
    from cnnfast.bench import fold_layer, kernel_name, layer_function, layer_parts, layer_residual
    from cnnfast.triton_kernels import add_relu as add_relu_module
    from cnnfast.triton_kernels import conv2d as conv2d_module
    from tests.test_torch_triton import tuners_that_time

    monkeypatch.setattr(conv2d_module, "chosen_configs", {})
    monkeypatch.setattr(conv2d_module, "tma_choices", {})
    problem = ConvProblem(C=16, H=6, W=5, K=64, R=3, S=3, stride=(1, 1), padding=(1, 1))

    def layer_inputs(problem, batch, dtype, device, epilogue="relu"):
        """Input, BN-folded weight and bias, and residual of the layer, as bench_layers makes them."""
        x, weight, bn = layer_parts(problem, batch, dtype, device)
        return (x, *fold_layer(weight, bn, dtype, device), layer_residual(problem, batch, epilogue, dtype, device))

    # In float32 the implicit GEMM's tile; in bfloat16 the spatial TMA kernel's (which the
    # interpreter always runs where it applies).
    x32, weight32, bias32, _ = layer_inputs(problem, 2, torch.float32, torch.device("cpu"))
    assert kernel_name("triton", problem, x32, weight32, bias32) is None  # not tuned yet
    layer_function("triton", problem, x32, weight32, bias32)()
    first_config = conv2d_module.conv2d_configs(flat=False, interpreted=True)[0]
    assert kernel_name("triton", problem, x32, weight32, bias32) == conv2d_module.config_name(first_config)
    x, weight, bias, _ = layer_inputs(problem, 2, torch.bfloat16, torch.device("cpu"))
    assert kernel_name("triton", problem, x, weight, bias) is None
    layer_function("triton", problem, x, weight, bias)()
    assert kernel_name("triton", problem, x, weight, bias) == "tma-2x4x8-16x16-g8-w4-s1"
    # The same geometry with a residual is tuned apart: named once it has run.
    *_, residual = layer_inputs(problem, 2, torch.bfloat16, torch.device("cpu"), "residual+relu")
    assert kernel_name("triton", problem, x, weight, bias, residual) is None
    layer_function("triton", problem, x, weight, bias, residual)()
    assert kernel_name("triton", problem, x, weight, bias, residual).startswith("tma-")
    assert kernel_name("torch", problem, x, weight, bias) is None
    # torch_triton: the epilogue's tile, once its tuner has chosen (two configs, so it times them).
    tuners_that_time(monkeypatch)
    assert kernel_name("torch_triton", problem, x, weight, bias) is None
    layer_function("torch_triton", problem, x, weight, bias)()
    chosen = add_relu_module.add_relu_strided_autotuned.best_config
    assert kernel_name("torch_triton", problem, x, weight, bias) == (
        f"torch+epilogue-strided-{chosen.kwargs['BLOCK_M']}x{chosen.kwargs['BLOCK_C']}-w{chosen.num_warps}")
    if "conv2d" in backends.cuda_ops():
        assert kernel_name("cuda", problem, x, weight, bias) == "cutlass-fprop-128x64x64"
        wide = ConvProblem(C=16, H=6, W=5, K=96, R=3, S=3, stride=(1, 1), padding=(1, 1))
        assert kernel_name("cuda", wide, x, weight, bias) == "cutlass-fprop-128x128x64"
        pointwise = ConvProblem(C=16, H=6, W=5, K=96, R=1, S=1, stride=(1, 1), padding=(0, 0))
        assert kernel_name("cuda", pointwise, x, weight, bias) == "cutlass-gemm-pingpong-128x128x64"


def test_progress_text_says_the_step_the_time_and_what_is_left():
    assert clock(5) == "0:05" and clock(754) == "12:34" and clock(3725) == "1:02:05"
    # Nothing finished yet: no estimate.
    assert progress_text(0, 4, "conv1", 2.0) == "[1/4] conv1 (0:02 elapsed)"
    # 3 of 4 steps took 90 s: the last one is expected to take 30 more.
    assert progress_text(3, 4, "fc", 90.0) == "[4/4] fc (1:30 elapsed, ~0:30 left)"
    assert progress_text(3, 4, "fc", 90.0, bar_width=8) == "[######..] 4/4 fc  1:30 elapsed, ~0:30 left"
    assert progress_text(1, 3, "x", 10.0, bar_width=6) == "[##....] 2/3 x  0:10 elapsed, ~0:20 left"


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_progress_redraws_one_row_on_a_terminal_and_writes_lines_elsewhere(terminal, monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    stream = Terminal() if terminal else io.StringIO()
    progress = Progress(3, show=True, stream=stream)
    for label in ("conv1", "layer1.0.conv1", "a label far too long to fit on one forty-column row"):
        progress.step(label)
    progress.close()
    text = stream.getvalue()
    if terminal:
        rows = text.split("\r")[1:]
        assert len(rows) == 3 and text.endswith("\n") and text.count("\n") == 1
        assert all(len(row.rstrip("\n")) == 39 for row in rows)  # padded or cut to the terminal's width
        assert rows[0].startswith("[" + "." * 20 + "] 1/3 conv1")
        assert rows[2].startswith("[" + "#" * 13 + "." * 7 + "] 3/3 a label")
    else:
        assert text.splitlines()[0] == "[1/3] conv1 (0:00 elapsed)" and len(text.splitlines()) == 3
        assert text.splitlines()[2].startswith("[3/3] a label far too long to fit on one forty-column row (")


def test_a_terminal_that_reports_no_width_gets_columns_or_80(monkeypatch):
    """`script` and some CI terminals report 0 columns: the bar is not cut to -1 characters."""
    from cnnfast.bench import terminal_columns

    class ZeroWidthTerminal(Terminal):
        def fileno(self):
            return 2

    asked = []
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: asked.append(fd) or os.terminal_size((0, 0)))
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    assert terminal_columns(ZeroWidthTerminal()) == 40 and asked == [2]
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size((0, 0)))
    assert terminal_columns(ZeroWidthTerminal()) == 80


def test_progress_shows_nothing_when_not_asked():
    stream = Terminal()
    progress = Progress(2, show=False, stream=stream)
    progress.step("conv1")
    progress.close()
    assert stream.getvalue() == ""


def test_bench_runs_cudnn_in_benchmark_mode_and_restores_the_setting(monkeypatch):
    from cnnfast import bench

    seen = []
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, **kwargs: seen.append(torch.backends.cudnn.benchmark) or 1.0)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    bench.run_bench("resnet18", input_size=32, max_layers=1, backends=["torch"], device="cpu")
    assert seen and all(seen) and torch.backends.cudnn.benchmark is False


def test_bench_lists_what_the_op_refuses_under_the_runs_settings_as_skipped(monkeypatch):
    """IEEE float32 on CUTLASS (which computes float32 as TF32): skipped with the op's own reason,
    rather than failing the run."""
    from cnnfast import bench

    monkeypatch.setattr(bench, "skip_reason", lambda backend, device: None)
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, **kwargs: 1.0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    result = bench.run_bench("resnet18", input_size=32, max_layers=1, backends=["torch", "cuda"], device="cpu",
                             end_to_end=False)
    assert result["backends"] == ["torch"] and "computes float32 as TF32 only" in result["skipped"]["cuda"]


@pytest.mark.parametrize("command", ["bench", "roofline"])
def test_backends_none_of_which_can_run_here_are_an_error_before_measuring(capsys, tmp_path, monkeypatch, command):
    from cnnfast import bench

    monkeypatch.setattr(bench, "skip_reason", lambda backend, device: f"{backend} is not here")
    monkeypatch.setattr(bench, "bench_layers", lambda *args: pytest.fail("measured"))
    code, out, err = run(capsys, command, "resnet18", "--backends", "triton,cuda",
                         *(("--out", str(tmp_path)) if command == "roofline" else ()))
    assert code == 2 and not out
    assert err.startswith(f"cnnfast {command}: error: none of the backends asked for can run here: "
                          "triton: triton is not here; cuda: cuda is not here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke cases give way to the GPU cases on a GPU")
def test_the_benchmark_files_cpu_smoke_cases_run_and_save_their_figures(tmp_path):
    """`pytest bench --benchmark-only`, as the README gives it, on a CPU: each benchmark file's
    smoke cases check their results against float64 and are timed into the JSON."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "-k", "cpu_smoke",
         "--benchmark-max-time=0.01", "--benchmark-min-rounds=2", f"--benchmark-json={path}"],
        # Without this run's pytest-xdist variables, which would turn pytest-benchmark off there.
        cwd=repo, env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = json.loads(path.read_text())["benchmarks"]
    files = {case["fullname"].split("::")[0] for case in cases}
    assert files == {f"bench/bench_{op}.py" for op in ("add_relu", "conv2d", "gap_linear", "global_avg_pool", "models")}
    for case in cases:
        assert case["stats"]["rounds"] >= 2 and case["stats"]["min"] > 0, case["name"]
        assert case["extra_info"]["device"] == "cpu", case["name"]
    assert {case["extra_info"]["backend"] for case in cases if "conv2d" in case["name"]} == {"torch", "triton",
                                                                                               "torch_triton"}
