"""backend="cudnn_fused": cuDNN's runtime-fused conv + bias + residual + ReLU behind cnnfast.ops.conv2d.

On the CPU: which ops, inputs and cuDNN settings it takes and the errors for the rest,
backend=None's fallbacks to torch, the launcher's plumbing and its reuse of the rounded bias, with
stand-ins for PyTorch's two cuDNN ops (they run on CUDA tensors only) that compute in float32,
round once and return PyTorch's layout; the NaN check that keeps a backend out of the timings,
and the model benchmark's cudnn_fused variant. On the GPU (marked gpu): CUDA-graph capture of a
bias not yet rounded, and backend=None choosing it from a table; every conv layer of every
architecture against float64, NaN, NCHW inputs and out= slices are in tests/test_conv2d_gpu.py,
with torch_triton's.
"""
import pytest
import torch
import torch.nn.functional as F

from cnnfast import ops, optimize, tuning
from cnnfast.backends import backends_of
from cnnfast.models import get_model
from cnnfast.testing import assert_close_to_reference
from tests.test_conv2d import Conv
from tests.test_conv2d import reference_conv2d as conv2d_reference
from tests.test_conv2d_gpu import PROBLEMS, make_problem, reference_conv2d

CHANNELS_LAST = torch.channels_last


def test_it_is_a_backend_of_the_convolution_only():
    assert "cudnn_fused" in backends_of("conv2d")
    for op in ("add_relu", "global_avg_pool", "gap_linear"):
        assert "cudnn_fused" not in backends_of(op) and "torch" in backends_of(op)


@pytest.mark.parametrize("op, call", [
    ("add_relu", lambda: ops.add_relu(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), backend="cudnn_fused")),
    ("global_avg_pool", lambda: ops.global_avg_pool(torch.zeros(1, 2, 3, 3), backend="cudnn_fused")),
    ("gap_linear", lambda: ops.gap_linear(torch.zeros(2, 6, 3, 3), torch.zeros(10, 6), backend="cudnn_fused")),
])
def test_other_ops_refuse_it(op, call):
    with pytest.raises(NotImplementedError, match=rf"{op}: backend 'cudnn_fused' has no kernel for this op \(it runs conv2d only\)"):
        call()


def test_it_needs_cuda_tensors():
    with pytest.raises(RuntimeError, match="conv2d: backend 'cudnn_fused' needs CUDA tensors, got a tensor on cpu"):
        ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), relu=True, backend="cudnn_fused")


def test_it_refuses_a_layer_without_relu_or_with_groups():
    # Meta tensors pass the device check (shapes only), so the layer's rules are what refuse.
    x, w = torch.empty(1, 8, 5, 5, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    assert ops.conv2d(x, w, relu=True, backend="cudnn_fused").shape == (1, 8, 3, 3)
    with pytest.raises(NotImplementedError, match="backend 'cudnn_fused' runs layers that end in a ReLU only"):
        ops.conv2d(x, w, backend="cudnn_fused")
    with pytest.raises(NotImplementedError, match="backend 'cudnn_fused' supports groups=1 only, got groups=2"):
        ops.conv2d(x, torch.empty(8, 4, 3, 3, device="meta"), groups=2, relu=True, backend="cudnn_fused")


@pytest.mark.parametrize("setting", ["disabled", "cudnn_deterministic", "deterministic_algorithms"])
def test_cudnn_settings_keep_it_off(monkeypatch, setting):
    """PyTorch's fused op ignores torch.backends.cudnn.enabled and never selects deterministic
    algorithms: under those settings an explicit request is refused and backend=None runs torch."""
    x, w = torch.empty(1, 8, 5, 5, device="meta"), torch.empty(8, 8, 3, 3, device="meta")
    if setting == "disabled":
        monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    elif setting == "cudnn_deterministic":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    message = "is False" if setting == "disabled" else "deterministic algorithms are asked for"
    with pytest.raises(RuntimeError, match=f"backend 'cudnn_fused' cannot run here: .*{message}"):
        ops.conv2d(x, w, relu=True, backend="cudnn_fused")
    chosen = []
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: backend or "cudnn_fused")
    monkeypatch.setattr(ops, "_conv2d_dispatch", lambda *args: chosen.append(args[-1]) or torch.empty(0))
    ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), relu=True)
    assert chosen == ["torch"]


def test_a_cudnn_failure_names_the_backend_and_the_layer(monkeypatch):
    def no_engine(*args):
        raise RuntimeError("GET was unable to find an engine to execute this computation")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", no_engine)
    with pytest.raises(RuntimeError, match=r"backend 'cudnn_fused' could not run the layer \(input \(1, 3, 8, 8\) "
                                           r"torch.bfloat16, weight \(5, 3, 3, 3\).*GET was unable to find an engine"):
        ops._conv2d_cudnn_fused(torch.randn(1, 3, 8, 8).bfloat16(), torch.randn(5, 3, 3, 3).bfloat16(), None, None,
                                (1, 1), (1, 1), (1, 1))


def test_default_runs_a_layer_without_relu_on_torch(monkeypatch):
    # The table's choice for a layer geometry was measured with a ReLU; the same geometry without one
    # (a downsample conv) cannot run on cuDNN's fused op and goes to torch.
    chosen = []
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: backend or "cudnn_fused")
    monkeypatch.setattr(ops, "_conv2d_dispatch", lambda *args: chosen.append(args[-1]) or torch.empty(0))
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    ops.conv2d(x, w, relu=True)
    ops.conv2d(x, w)
    assert chosen == ["cudnn_fused", "torch"]


@pytest.mark.parametrize("backend", ["cudnn_fused", "cudnn"])
def test_optimize_refuses_it_and_unknown_backends(backend):
    model = get_model("resnet18").eval()
    message = "runs only conv2d" if backend == "cudnn_fused" else "unknown backend 'cudnn'"
    with pytest.raises(ValueError, match=message):
        optimize(model, backend=backend)


@pytest.fixture
def stand_ins(monkeypatch):
    """PyTorch's cuDNN ops replaced by CPU versions that record their arguments; the device check
    is lifted so the launcher runs on CPU tensors."""
    calls = []

    def fused(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation, groups)
        y = y if z is None else y + alpha * z.float()
        # PyTorch picks the result's layout from x and the weight: NCHW unless one is channels_last.
        channels_last = any(t.is_contiguous(memory_format=CHANNELS_LAST) and not t.is_contiguous() for t in (x, weight))
        return torch.relu(y).to(x.dtype).contiguous(memory_format=CHANNELS_LAST if channels_last else torch.contiguous_format)

    def convolution_relu(x, weight, bias, stride, padding, dilation, groups):
        calls.append(dict(op="relu", bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups))
        return fused(x, weight, None, None, bias, stride, padding, dilation, groups)

    def convolution_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        calls.append(dict(op="add_relu", z=z, alpha=alpha, bias=bias, stride=stride, padding=padding,
                          dilation=dilation, groups=groups))
        return fused(x, weight, z, alpha, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", convolution_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", convolution_add_relu)
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: backend)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("bias", [None, torch.float32, "input"], ids=["no-bias", "f32-bias", "input-dtype-bias"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_launcher_passes_the_layer_to_cudnn(stand_ins, dtype, residual, bias, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 7).to(dtype)
    x = x.contiguous(memory_format=CHANNELS_LAST) if layout == "channels_last" else x
    w = (torch.randn(10, 6, 3, 2) / 6).to(dtype)
    b = None if bias is None else torch.randn(10).to(dtype if bias == "input" else bias)
    conv = Conv(2, 6, 9, 7, 10, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    res = torch.randn(conv.output_shape()).to(dtype) if residual else None
    y = ops.conv2d(x, w, b, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, residual=res,
                   relu=True, backend="cudnn_fused")
    assert y.is_contiguous(memory_format=CHANNELS_LAST)
    # (The bias reaches cuDNN rounded to x's dtype: within the tolerance of the float64 reference.)
    assert_close_to_reference(y, conv2d_reference(conv, x, w, b, res, relu=True), "conv")
    (call,) = stand_ins
    assert call["op"] == ("add_relu" if residual else "relu")
    assert call["bias"] is None if b is None else call["bias"].dtype == dtype
    assert (call["stride"], call["padding"], call["dilation"], call["groups"]) == ([2, 1], [1, 0], [1, 2], 1)
    if residual:
        assert call["z"] is res and call["alpha"] == 1.0


def test_launcher_writes_into_a_channel_slice(stand_ins):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CHANNELS_LAST)
    w, b = torch.randn(5, 8, 3, 3) / 8, torch.randn(5)
    res = torch.randn(2, 5, 6, 6)
    big = torch.full((2, 12, 6, 6), float("nan")).contiguous(memory_format=CHANNELS_LAST)
    out = ops.conv2d(x, w, b, padding=1, residual=res, relu=True, out=big[:, 3:8], backend="cudnn_fused")
    assert out.data_ptr() == big[:, 3:8].data_ptr()
    expected = conv2d_reference(Conv(2, 8, 6, 6, 5, 3, 3, padding=1), x, w, b, res, relu=True)
    assert_close_to_reference(big[:, 3:8], expected, "conv")
    assert big[:, :3].isnan().all() and big[:, 8:].isnan().all()


def test_the_bias_is_rounded_on_every_call_so_every_write_is_seen(stand_ins):
    """cuDNN's graph takes the bias in x's dtype: rounded from the current values on each call, so
    a write through .data (which moves no version counter) and an in-place one are both seen."""
    x, w, b = torch.randn(1, 4, 5, 5).bfloat16(), torch.randn(6, 4, 3, 3).bfloat16(), torch.randn(6)
    ops.conv2d(x, w, b, relu=True, backend="cudnn_fused")
    b.data.add_(1.0)
    ops.conv2d(x, w, b, relu=True, backend="cudnn_fused")
    b.add_(1.0)
    ops.conv2d(x, w, b, relu=True, backend="cudnn_fused")
    assert [torch.equal(call["bias"], b.bfloat16()) for call in stand_ins] == [False, False, True]
    assert torch.equal(stand_ins[1]["bias"], (b - 1).bfloat16())


def test_batch_zero(stand_ins):
    y = ops.conv2d(torch.randn(0, 4, 5, 5), torch.randn(6, 4, 3, 3), relu=True, backend="cudnn_fused")
    assert y.shape == (0, 6, 3, 3)


def test_model_benchmark_variant_puts_relu_layers_on_cudnn_fused():
    # bench/bench_models.py's cnnfast_cudnn variant: convs and FC layers with a ReLU on cudnn_fused,
    # the rest (downsample convs, the last FC layer, the GAP head) on torch.
    from bench.bench_models import convs_on
    from cnnfast.nn import ConvBNReLU, GlobalAvgPoolLinear, LinearReLU

    for arch in ("resnet50", "vgg16"):
        model = convs_on(optimize(get_model(arch).eval()), "cudnn_fused")
        fused = {name: m for name, m in model.named_modules() if isinstance(m, (ConvBNReLU, LinearReLU, GlobalAvgPoolLinear))}
        assert {m.backend for m in fused.values()} == {"cudnn_fused", "torch"}
        for name, m in fused.items():
            assert m.backend == ("cudnn_fused" if getattr(m, "relu", False) else "torch"), name
    assert model.classifier[0].backend == "cudnn_fused" and model.classifier[-1].backend == "torch"


# ------------------------------------------------------------------------------------- on the GPU

@pytest.mark.gpu
def test_graph_capture_with_a_bias_not_yet_rounded():
    """The bias is rounded inside the graph (each replay rounds its current values); replays and
    later eager calls are right."""
    problem = next(p for p in PROBLEMS if p.R == 3 and p.C == 64 and p.K == 64)
    x, w, b, _, _ = make_problem(problem, 2, torch.bfloat16)
    layer = dict(stride=problem.stride, padding=problem.padding, relu=True, backend="cudnn_fused")
    expected = reference_conv2d(x, w, b, None, problem.stride, problem.padding)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.conv2d(x, w, b.clone(), **layer)  # cuDNN's plan for this layer, with another bias
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.conv2d(x, w, b, **layer)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(y, expected, "conv")
    assert_close_to_reference(ops.conv2d(x, w, b, **layer), expected, "conv")


@pytest.mark.gpu
def test_default_backend_runs_it_where_the_table_says(monkeypatch):
    tuning._layer_backend.cache_clear()
    problem = next(p for p in PROBLEMS if p.R == 3 and p.C == 64 and p.K == 64)
    geometry = (problem.C, problem.H, problem.W, problem.K, problem.R, problem.S, problem.stride, problem.padding, (1, 1))
    # The no-ReLU entry stands for a hand-edited table: cudnn_fused cannot run that layer.
    layers = {tuning.conv2d_layer_key(*geometry, epilogue): {"2": "cudnn_fused"} for epilogue in ("relu", "none")}
    table = {torch.cuda.get_device_name(): {tuning.CONV_LAYERS: {"bfloat16": layers}}}
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    x, w, b, _, _ = make_problem(problem, 2, torch.bfloat16)
    ran, cudnn_fused = [], ops._conv2d_cudnn_fused
    monkeypatch.setattr(ops, "_conv2d_cudnn_fused", lambda *args: ran.append(args) or cudnn_fused(*args))
    try:
        ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, relu=True)
        ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding)  # no ReLU: torch
    finally:
        tuning._layer_backend.cache_clear()
    assert len(ran) == 1


def test_a_relu_that_zeroes_nan_is_not_timed(monkeypatch):
    # The check `cnnfast tune`, `cnnfast bench` and the conv benchmark run once per backend before
    # timing it (here on CPU tensors, with the torch backend as the kernel under test).
    from cnnfast import bench

    assert bench.relu_keeps_nan.__wrapped__("torch", torch.device("cpu"))
    conv2d = ops.conv2d
    monkeypatch.setattr(ops, "conv2d", lambda *args, **kwargs: conv2d(*args, **kwargs).nan_to_num_(0.0))
    assert not bench.relu_keeps_nan.__wrapped__("torch", torch.device("cpu"))
    monkeypatch.setattr(bench, "relu_keeps_nan", lambda backend, device: backend != "cudnn_fused")
    assert bench.skip_reason("cudnn_fused", "cuda") == "its ReLU turns NaN into 0, where torch.relu keeps NaN"
    assert bench.skip_reason("triton", "cuda") is None
