"""The GPU half of the reliability checks: the fixed problem list of tests/test_conv2d.py (the odd
shapes) through the public op in every dtype and several layouts on the GPU backends (in bfloat16 on
torch_triton and cuDNN's fused convolution too, which backend=None may choose for a layer), results
of cnnfast's own kernels repeated bit for bit over 100 runs, and a convolution over 2^31 elements
against PyTorch run on a slice of the batch. (Every real layer on the GPU is in
tests/test_conv2d_gpu.py; the memory-bound ops' 2^31 cases sit in their own test files.)
"""
import pytest
import torch

from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels import conv2d as conv2d_module
from cnnfast.triton_kernels.conv2d import conv2d_bias_act, split_k_configs
from tests.test_conv2d import ODD_SHAPES, Conv, conv_id, in_layout, make_inputs, nan_output, reference_conv2d
from tests.test_conv2d_gpu import PROBLEMS, make_problem, tolerance_kind

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_LAYOUTS = ("channels_last", "nchw", "channel_slice")
# (float32 on the CUTLASS kernel is TF32, which PyTorch's convolution setting, TF32 by default, allows.)
BACKEND_DTYPES = [(backend, dtype) for backend in ("triton", "cuda") for dtype in DTYPES] + [
    (backend, torch.bfloat16) for backend in ("torch_triton", "cudnn_fused")]


def to_cuda(t):
    return None if t is None else t.cuda()


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("conv", ODD_SHAPES, ids=conv_id)
def test_odd_shapes(conv, backend, dtype, layout):
    """x, weight and residual in `layout`, a float32 bias, ReLU, into a NaN-filled channels_last out."""
    torch.manual_seed(0)
    x, weight, bias, res = (to_cuda(t) for t in make_inputs(conv, dtype))
    x, weight, res = in_layout(x, layout), in_layout(weight, layout), in_layout(res, layout)
    out = nan_output(conv.output_shape(), dtype).cuda()
    ops.conv2d(x, weight, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, residual=res,
               relu=True, out=out, backend=backend)
    assert_close_to_reference(out, reference_conv2d(conv, x, weight, bias, res, relu=True), tolerance_kind(dtype))


# ---------------------------------------------------------------- bitwise repeatability


def resnet50_layer(c, k, r, h):
    return next(p for p in PROBLEMS if (p.C, p.K, p.R, p.H) == (c, k, r, h))


REPEATED = {  # name: a function of the backend that returns the op's call
    "conv2d-3x3": lambda backend: conv2d_call(resnet50_layer(128, 128, 3, 28), backend),
    "conv2d-1x1-residual": lambda backend: conv2d_call(resnet50_layer(64, 256, 1, 56), backend, residual=True),
    "add_relu": lambda backend: elementwise_call(ops.add_relu, backend, 2),
    "global_avg_pool": lambda backend: elementwise_call(ops.global_avg_pool, backend, 1),
}


def conv2d_call(problem, backend, residual=False):
    x, w, b, res, _ = make_problem(problem, 8, torch.bfloat16)
    res = res if residual else None
    return lambda: ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True,
                              backend=backend)


def elementwise_call(op, backend, inputs):
    tensors = [torch.randn(32, 256, 28, 28, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
               for _ in range(inputs)]
    return lambda: op(*tensors, backend=backend)


@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("name", REPEATED)
def test_100_runs_are_bitwise_identical(name, backend):
    torch.manual_seed(0)
    call = REPEATED[name](backend)
    first = call()
    assert first.isfinite().all()
    for _ in range(100):
        assert torch.equal(first, call())


@pytest.mark.parametrize("config_index", range(len(split_k_configs(flat=False))))
def test_split_k_100_runs_are_bitwise_identical(config_index):
    """Each split-K config on ResNet-50's last 3x3 layer at batch 1 (49 output pixels): 100 runs
    give the same bits, which they would not if a tile's last arrival summed a partial before it
    was written, or if a counter were left set for the next launch."""
    problem = resnet50_layer(512, 512, 3, 7)
    x, w, b, res, _ = make_problem(problem, 1, torch.bfloat16)
    config = split_k_configs(flat=False)[config_index]
    expected = reference_conv2d(Conv(1, 512, 7, 7, 512, 3, 3, padding=1), x, w, b, res, relu=True)

    def call():
        out = torch.full_like(res, float("nan"))
        conv2d_bias_act(x, w, b, res, out, problem.stride, problem.padding, (1, 1), True, config=config)
        return out

    first = call()
    assert_close_to_reference(first, expected, "conv")
    for _ in range(100):
        assert torch.equal(first, call())


# ---------------------------------------------------------------- past 2^31 elements


@pytest.mark.parametrize(
    "backend, kernel, k, tma",
    [("triton", 3, 64, False), ("triton", 3, 64, True), ("triton", 1, 96, True), ("cuda", 3, 64, False),
     ("cuda", 1, 96, False), ("torch_triton", 3, 64, False), ("cudnn_fused", 3, 64, False)],
    ids=["triton", "triton-3x3-tma", "triton-1x1-tma", "cuda", "cuda-1x1-gemm", "torch_triton", "cudnn_fused"])
def test_conv2d_past_2_31_elements(monkeypatch, backend, kernel, k, tma):
    """700 x 64 x 224 x 224 bfloat16 in (2.25e9 elements, 4.5 GB) and 700 x K x 224 x 224 out: the
    first and last two images, random, must match PyTorch run on those images alone; the zero
    images in between must give exactly the bias through the ReLU. On the CUDA backend the 3x3
    layer runs the 64-wide fprop and the 1x1 one with K = 96 the GEMM (3.4e9 output elements); on
    the Triton backend the 3x3 one runs the implicit GEMM, and then the spatial TMA kernel, and the
    1x1 one the pointwise TMA kernel, each TMA kernel without timing it against the implicit GEMM.
    (cudnn_fused rounds the bias to bfloat16 first: the ReLU of the rounded bias is the same.)"""
    if backend == "triton":
        monkeypatch.setattr(conv2d_module, "kernels_can_be_timed", lambda: False)
        monkeypatch.setattr(conv2d_module, "tma_choices", {})
        if not tma:
            monkeypatch.setattr(conv2d_module, "TMA_KERNELS", ())
    conv = Conv(700, 64, 224, 224, k, kernel, kernel, padding=kernel // 2)
    x = torch.zeros(conv.n, conv.c, conv.h, conv.w, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    for index in (0, -2, -1):
        x[index] = torch.randn(conv.c, conv.h, conv.w, device="cuda").to(torch.bfloat16)
    weight = torch.randn(conv.k, conv.c, kernel, kernel, device="cuda") / (kernel * kernel * conv.c) ** 0.5
    weight = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(conv.k, device="cuda")
    out = ops.conv2d(x, weight, bias, padding=kernel // 2, relu=True, backend=backend)
    if backend == "triton":
        ran = conv2d_module.tuned_kernel_name(x, weight, bias, None, x.dtype, (1, 1), (kernel // 2,) * 2, (1, 1))
        assert ran.startswith("tma-") == tma, ran
    for part in (slice(0, 1), slice(-2, None)):
        assert_close_to_reference(out[part], reference_conv2d(conv, x[part], weight, bias, relu=True), "conv")
    expected = torch.relu(bias).to(torch.bfloat16).view(1, -1, 1, 1).expand(conv.n - 3, -1, conv.h, conv.w)
    assert torch.equal(out[1:-2], expected)
