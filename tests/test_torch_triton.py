"""backend="torch_triton": PyTorch's convolution, then bias + residual + ReLU in one Triton pass.

On the CPU (oneDNN's convolution, the epilogue under the Triton interpreter): every distinct conv
layer of every architecture and the odd shapes against float64, each epilogue, the 1x1 layers'
matrix product, NCHW and strided inputs, out= slices, NaN and Inf, that the epilogue writes over
the convolution's own result (one pass, no copy), and which ops take the backend. The cases it
shares with the other backends (out= strides, batch 0, integer values exactly, torch.compile, FLOP
counting, the bad-input contract, groups) are in tests/test_conv2d.py. On the GPU (marked gpu):
CUDA-graph capture here; every layer against float64, NaN and layouts, and a channel slice in
tests/test_conv2d_gpu.py, with cudnn_fused's.
"""
import pytest
import torch
import torch.nn.functional as F
import triton

from bench.bench_models import convs_on
from cnnfast import backends, ops, optimize
from cnnfast.backends import backends_of
from cnnfast.models import get_model
from cnnfast.nn import ConvBNReLU, GlobalAvgPoolLinear, LinearReLU
from cnnfast.testing import assert_close_to_reference
from tests.test_conv2d import (
    DTYPES, EPILOGUES, LAYOUTS, NAN, ODD_SHAPES, POINTWISE, REAL_LAYERS, Conv, conv_id, in_layout, layer_id,
    check_conv2d, make_inputs, real_layer_problem, reference_conv2d, run_conv2d,
)
from tests.test_conv2d_gpu import PROBLEMS, make_problem
from tests.test_conv2d_gpu import reference_conv2d as gpu_reference_conv2d

CHANNELS_LAST = torch.channels_last
on_host = pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="runs the Triton epilogue on CPU tensors")


def test_it_is_a_backend_of_the_convolution_only():
    assert "torch_triton" in backends_of("conv2d")
    for op in ("add_relu", "global_avg_pool", "gap_linear"):
        assert "torch_triton" not in backends_of(op)
    with pytest.raises(NotImplementedError, match=r"add_relu: backend 'torch_triton' has no kernel .*conv2d only"):
        ops.add_relu(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), backend="torch_triton")


def test_it_needs_cuda_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "TRITON_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="conv2d: backend 'torch_triton' needs CUDA tensors, got a tensor on cpu"):
        ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), relu=True, backend="torch_triton")


# Every distinct layer in bfloat16, every third in float16 and float32: float32 bias and ReLU, a
# residual on every other one, and every other pair into a NaN-filled out= (the rest in place over
# the convolution's result).
REAL_LAYER_CASES = [
    pytest.param(index, dtype, id=f"{layer_id(layer)}-{str(dtype)[6:]}")
    for index, layer in enumerate(REAL_LAYERS)
    for dtype in [torch.bfloat16] + ([torch.float16, torch.float32] if index % 3 == 0 else [])
]


@on_host
@pytest.mark.parametrize("index, dtype", REAL_LAYER_CASES)
def test_real_layer(index, dtype):
    check_conv2d(real_layer_problem(*REAL_LAYERS[index]), dtype, residual=index % 2 == 1, relu=True,
                 backend="torch_triton", into_out=index % 4 < 2, seed=index)


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", ODD_SHAPES, ids=conv_id)
def test_odd_shape(conv, dtype):
    check_conv2d(conv, dtype, relu=True, backend="torch_triton")


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("conv", [Conv(2, 5, 7, 7, 7, 5, 5, padding=2), POINTWISE], ids=["5x5", "pointwise"])
def test_epilogue(conv, epilogue, dtype):
    bias_dtype, residual, relu = EPILOGUES[epilogue]
    check_conv2d(conv, dtype, bias_dtype=dtype if bias_dtype == "input" else bias_dtype, residual=residual, relu=relu,
                 backend="torch_triton")


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_layers_are_one_matrix_product(monkeypatch, dtype):
    """On a CPU a 1x1 stride-1 channels_last layer of any dtype is one torch.mm (no bias, no residual
    in it: the epilogue adds them); NCHW input stays on the convolution."""
    products = []
    monkeypatch.setattr(torch, "mm", lambda *args, mm=torch.mm: products.append(args) or mm(*args))
    check_conv2d(POINTWISE, dtype, relu=True, backend="torch_triton")
    assert len(products) == 1
    products.clear()
    x, weight, bias, res = make_inputs(POINTWISE, dtype)
    y = ops.conv2d(x.contiguous(), weight, bias, residual=res, relu=True, backend="torch_triton")
    assert_close_to_reference(y, reference_conv2d(POINTWISE, x, weight, bias, res, relu=True), "conv")
    assert not products


@on_host
@pytest.mark.parametrize("conv", [Conv(2, 16, 6, 7, 12, 3, 3, padding=1), POINTWISE], ids=["3x3", "pointwise"])
def test_the_epilogue_writes_over_the_convolutions_result(monkeypatch, conv):
    """One pass after the convolution: the layer's output is the buffer PyTorch's convolution (or
    matrix product) returned, with bias, residual and ReLU applied in place."""
    results = []
    def recording(original):
        def call(*args):
            results.append(original(*args))
            return results[-1]
        return call

    for module, name in ((F, "conv2d"), (torch, "mm")):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, torch.bfloat16)
    y = ops.conv2d(x, weight, bias, residual=res, relu=True, padding=conv.padding, backend="torch_triton")
    (result,) = results
    assert y.data_ptr() == result.data_ptr()
    assert_close_to_reference(y, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


def tuners_that_time(monkeypatch):
    """Gives add_relu's two tuners the interpreter's two configs each and a timer that runs a config
    three times, as timing on a GPU does (the interpreter's tuners hold one config and never time)."""
    from cnnfast.triton_kernels import add_relu as module

    def run_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0] * len(quantiles)

    for name, kernel, configs in (
        ("add_relu_strided_autotuned", module.add_relu_strided_kernel, module.add_relu_strided_configs(True)),
        ("add_relu_flat_autotuned", module.add_relu_flat_kernel, module.add_relu_flat_configs(True)),
    ):
        tuner = getattr(module, name)
        monkeypatch.setattr(module, name, triton.autotune(configs=configs, key=tuner.keys, do_bench=run_three_times)(kernel))


@on_host
@pytest.mark.parametrize("epilogue", ["bias", "residual", "bias-residual"])
def test_tuning_in_place_adds_the_epilogue_once(monkeypatch, epilogue):
    """The first call of a shape tunes the epilogue, running each config several times; in place,
    each run would add the bias and residual again. The bias-only case takes the strided kernel,
    the residual-only one the flat kernel."""
    tuners_that_time(monkeypatch)
    conv = Conv(2, 16, 6, 7, 24, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, torch.float32)
    bias, res = (bias if "bias" in epilogue else None), (res if "residual" in epilogue else None)
    for _ in range(2):  # tuned, then the choice read back
        y = run_conv2d(conv, x, weight, bias, res, relu=False, backend="torch_triton")
        assert_close_to_reference(y, reference_conv2d(conv, x, weight, bias, res), "conv")


@on_host
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts(layout, dtype):
    """x and residual in `layout` (an NCHW convolution result is written into a new channels_last
    output by the same pass), a strided bias: a channels_last result that matches the reference."""
    conv = Conv(2, 12, 6, 7, 10, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x, res = in_layout(x, layout), in_layout(res, layout)
    strided_bias = torch.full((2 * conv.k,), NAN)[::2]
    strided_bias.copy_(bias)
    y = run_conv2d(conv, x, weight, strided_bias, res, relu=True, backend="torch_triton")
    assert y.is_contiguous(memory_format=CHANNELS_LAST)
    assert_close_to_reference(y, reference_conv2d(conv, x, weight, bias, res, relu=True), "conv")


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_torch(dtype):
    """NaN and Inf in x reach the outputs whose receptive field holds them, through bias, residual
    and ReLU (NaN stays NaN, -Inf becomes 0); a NaN in the residual reaches its own output."""
    conv = Conv(2, 6, 9, 8, 5, 3, 3, padding=1)
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(conv, dtype)
    x[0, 1, 0, 0] = NAN
    x[0, 0, 5, 1] = float("inf")
    x[-1, 0, 1, 3] = float("-inf")
    res[1, 2, 4, 4] = NAN
    y = run_conv2d(conv, x, weight, bias, res, relu=True, backend="torch_triton")
    expected = reference_conv2d(conv, x, weight, bias, res, relu=True)
    assert expected.isnan().any() and expected.isinf().any() and not expected.isnan().all()
    assert_close_to_reference(y, expected, "conv")


def test_model_benchmark_variant_puts_every_conv_on_torch_triton():
    # bench/bench_models.py's cnnfast_torch_triton variant: every conv and FC layer (with or without
    # ReLU) on torch_triton, the other fused ops (the GAP head) on torch.
    for arch in ("resnet50", "vgg16"):
        model = convs_on(optimize(get_model(arch).eval()), "torch_triton")
        for name, m in model.named_modules():
            if isinstance(m, (ConvBNReLU, LinearReLU)):
                assert m.backend == "torch_triton", name
            elif isinstance(m, GlobalAvgPoolLinear):
                assert m.backend == "torch", name


# ------------------------------------------------------------------------------------- on the GPU

@pytest.mark.gpu
def test_graph_capture_on_gpu():
    problem = next(p for p in PROBLEMS if p.R == 1 and p.C == 64 and p.K == 256)
    x, w, b, res, _ = make_problem(problem, 2, torch.bfloat16)
    layer = dict(stride=problem.stride, padding=problem.padding, residual=res, relu=True, backend="torch_triton")
    expected = gpu_reference_conv2d(x, w, b, res, problem.stride, problem.padding)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up = ops.conv2d(x, w, b, **layer)  # compiles and tunes the epilogue outside the capture
    torch.cuda.current_stream().wait_stream(side)
    assert_close_to_reference(warm_up, expected, "conv")  # tuning in place added the epilogue once
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.conv2d(x, w, b, **layer)
    x.copy_(torch.randn_like(x))  # a replay reads the new input
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(y, gpu_reference_conv2d(x, w, b, res, problem.stride, problem.padding), "conv")
