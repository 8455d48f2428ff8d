"""conv2d on a GPU: every distinct conv layer of every architecture, at its real size, against float64,
on the Triton and CUTLASS kernels and on the two backends built on PyTorch's convolution
(torch_triton and cudnn_fused); the CUTLASS kernel choice and channel slices; the torch backend.

Weights are scaled by 1/sqrt(fan_in) as in a trained network, so outputs are O(1) and the
tolerance table applies as written (TF32 included) whatever the reduction length.
"""
import pytest
import torch
import torch.nn.functional as F

from cnnfast import ops
from cnnfast.precision import tf32_allowed
from cnnfast.analysis import analyze_arch, conv_problems
from cnnfast.models import ARCHITECTURES
from cnnfast.testing import assert_close_to_reference
from cnnfast.triton_kernels import conv2d as conv2d_module
from cnnfast.triton_kernels import conv2d_pointwise, conv2d_spatial
from cnnfast.triton_kernels.conv2d import (
    config_fits, conv2d_bias_act, conv2d_configs, split_k_configs, use_flat_reduction,
)

pytestmark = pytest.mark.gpu


def all_conv_problems():
    seen = {}
    for arch in ARCHITECTURES:
        for problem, layers in conv_problems(analyze_arch(arch)).items():
            seen.setdefault(problem, f"{arch}.{layers[0]}")
    return seen


PROBLEMS = all_conv_problems()


def make_problem(problem, batch, dtype):
    """x, w (scaled by 1/sqrt(fan_in)), float32 bias, residual, and a NaN-filled output."""
    x = torch.randn(batch, problem.C, problem.H, problem.W, device="cuda").to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fan_in = problem.C * problem.R * problem.S
    w = (torch.randn(problem.K, problem.C, problem.R, problem.S, device="cuda") / fan_in**0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(problem.K, device="cuda")
    p, q = ops.conv2d_output_size("conv2d", x.shape, w.shape, problem.stride, problem.padding, (1, 1))
    res = torch.randn(batch, problem.K, p, q, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    return x, w, b, res, torch.full_like(res, float("nan"))


def reference_conv2d(x, w, b, residual, stride, padding):
    y = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y)


@pytest.fixture
def needs_cutlass():
    """Skips a CUDA-backend conv test when cnnfast._C was built without the CUTLASS headers."""
    from cnnfast.backends import cuda_extension

    if "conv2d" not in cuda_extension().build_info()["ops"]:
        pytest.skip("cnnfast._C was built without CUTLASS")


def tolerance_kind(dtype):
    return "tf32" if dtype == torch.float32 and tf32_allowed("conv") else "conv"


# Every layer in bfloat16, every fourth in float16 and float32. Each case runs one config of the
# autotuning set (of those whose pipeline fits in shared memory at that dtype), in rotation, so
# every config runs on real layers without tuning each case.
CASES = [
    pytest.param(problem, dtype, i, id=f"{name}-{str(dtype)[6:]}")
    for i, (problem, name) in enumerate(PROBLEMS.items())
    for dtype in ([torch.bfloat16] + ([torch.float16, torch.float32] if i % 4 == 0 else []))
]


@pytest.mark.parametrize("problem, dtype, config_index", CASES)
def test_triton_every_layer(problem, dtype, config_index):
    torch.manual_seed(0)
    x, w, b, res, out = make_problem(problem, 2, dtype)
    flat = use_flat_reduction(problem.C)
    configs = conv2d_configs(flat=flat) + split_k_configs(flat=flat)
    fitting = [config for config in configs if config_fits(config, dtype, x.device)]
    config = fitting[config_index % len(fitting)]
    conv2d_bias_act(x, w, b, res, out, problem.stride, problem.padding, (1, 1), True, config=config)
    assert_close_to_reference(out, reference_conv2d(x, w, b, res, problem.stride, problem.padding), tolerance_kind(dtype))


# The 1x1 stride-1 layers on the persistent TMA kernel, each of its configs in rotation (those whose
# shared memory fits with a residual), float16 and bfloat16, batch 2 (a partial row tile) with a
# residual: the op may measure the implicit GEMM faster on some layers, so the TMA kernel is run
# here directly on every one.
def tma_cases(takes):
    """(problem, dtype, index) of every layer that `takes(problem)`, in bfloat16 and float16."""
    return [
        pytest.param(problem, dtype, i, id=f"{name}-{str(dtype)[6:]}")
        for i, (problem, name) in enumerate((problem, name) for problem, name in PROBLEMS.items() if takes(problem))
        for dtype in (torch.bfloat16, torch.float16)
    ]


POINTWISE_CASES = tma_cases(lambda problem: (problem.R, problem.S, problem.stride, problem.padding) == (1, 1, (1, 1), (0, 0)))


@pytest.mark.parametrize("problem, dtype, config_index", POINTWISE_CASES)
def test_triton_pointwise_every_1x1_layer(problem, dtype, config_index):
    check_tma_kernel_on_layer(conv2d_pointwise, conv2d_pointwise.conv2d_pointwise_configs(), problem, dtype,
                              config_index)


def check_tma_kernel_on_layer(module, configs, problem, dtype, config_index):
    """The layer at batch 2 with a residual on TMA kernel module, launched with the config_index-th
    (in rotation) of its configs that fit with a residual, against float64."""
    torch.manual_seed(0)
    x, w, b, res, out = make_problem(problem, 2, dtype)
    assert module.applies(x, w, res, out, problem.stride, problem.padding, (1, 1))
    fitting = [config for config in configs if module.fits(config, x, has_residual=True)]
    config = fitting[config_index % len(fitting)]
    module.launch(x, w, b, res, out, problem.stride, problem.padding, (1, 1), True, config=config)
    assert_close_to_reference(out, reference_conv2d(x, w, b, res, problem.stride, problem.padding), "conv")


def spatial_takes(problem) -> bool:
    """The layers of the spatial TMA kernel: larger filters at a stride that divides the map (with
    a column stride, C a multiple of the 64-channel block); unpadded strided 1x1 layers."""
    if problem.C % 8:
        return False
    if (problem.R, problem.S) == (1, 1):
        return problem.stride != (1, 1) and problem.padding == (0, 0)
    divides = problem.H % problem.stride[0] == 0 and problem.W % problem.stride[1] == 0
    return divides and (problem.stride[1] == 1 or problem.C % 64 == 0)


# The layers the spatial TMA kernel takes, each of its configs in rotation (those that fit with a
# residual, whatever shapes least_wasteful would offer), likewise.
SPATIAL_CASES = tma_cases(spatial_takes)


@pytest.mark.parametrize("problem, dtype, config_index", SPATIAL_CASES)
def test_triton_spatial_every_layer_it_takes(problem, dtype, config_index):
    # Strides of 7 through the 38 configs, the float16 case one past the bfloat16 one.
    check_tma_kernel_on_layer(conv2d_spatial, conv2d_spatial.conv2d_spatial_configs(), problem, dtype,
                              config_index * 7 + (dtype == torch.float16))


def replay_in_a_cuda_graph(x, w, b, res, padding, y, expected):
    """A call of the op captured in a CUDA graph and replayed into a NaN-filled out (like y) gives
    `expected` (a TMA kernel's descriptors are launch parameters, encoded on the host at capture)."""
    out = torch.full_like(y, float("nan"))
    ops.conv2d(x, w, b, padding=padding, residual=res, relu=True, backend="triton", out=out)  # compiled first
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.conv2d(x, w, b, padding=padding, residual=res, relu=True, backend="triton", out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, expected, "conv")


@pytest.mark.filterwarnings("error:cnnfast. the TMA conv kernel")  # a TMA kernel that fails to tune fails the test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_tma_choice_on_resnet50_layers_and_graph_replay(monkeypatch, dtype):
    """Through the op at batch 8: the first call of each of ResNet-50's stride-1 layers and
    strided 1x1 layers times the TMA kernel that takes it (1x1 stride 1: pointwise, the others:
    spatial) against the implicit GEMM and keeps one; the result is right either way. Then, with the TMA kernel made the choice of the last 1x1
    and the last 3x3 layer, a CUDA graph of a call of each replays it."""
    problems = [problem for problem in conv_problems(analyze_arch("resnet50"))
                if problem.stride == (1, 1) or (problem.R, problem.padding) == (1, (0, 0))]
    assert sum(problem.R == 1 for problem in problems) >= 9 and sum(problem.R == 3 for problem in problems) >= 4
    last = {}
    for problem in problems:
        torch.manual_seed(0)
        x, w, b, res, _ = make_problem(problem, 8, dtype)
        y = ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True,
                       backend="triton")
        expected = reference_conv2d(x, w, b, res, problem.stride, problem.padding)
        assert_close_to_reference(y, expected, "conv")
        key = conv2d_module.problem_key(x, w, b, res, dtype, problem.stride, problem.padding, (1, 1))
        assert key in conv2d_module.tma_choices
        if problem.stride == (1, 1):
            last[problem.R] = (key, x, w, b, res, y, problem.padding, expected)
    for module, (key, x, w, b, res, y, padding, expected) in ((conv2d_pointwise, last[1]), (conv2d_spatial, last[3])):
        monkeypatch.setitem(conv2d_module.tma_choices, key, (module, module.untimed_config(x, y, has_residual=True)))
        assert conv2d_module.tuned_kernel_name(x, w, b, res, dtype, (1, 1), padding, (1, 1)).startswith("tma-")
        replay_in_a_cuda_graph(x, w, b, res, padding, y, expected)


@pytest.mark.parametrize("arch", ["resnet18"])
def test_autotuned_op_on_real_layers(arch):
    # Through the public op, autotuning included, at batch 8.
    for problem in conv_problems(analyze_arch(arch)):
        x, w, b, res, out = make_problem(problem, 8, torch.bfloat16)
        y = ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, relu=True, backend="triton")
        assert_close_to_reference(y, reference_conv2d(x, w, b, None, problem.stride, problem.padding), "conv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_error_no_worse_than_cudnn_at_batch_8(dtype):
    # ResNet-50's layer3 3x3 conv at batch 8: our error against float64 is at most twice cuDNN's.
    problem = next(p for p in PROBLEMS if (p.C, p.K, p.R, p.H) == (256, 256, 3, 14))
    x, w, b, _, _ = make_problem(problem, 8, dtype)
    ref = reference_conv2d(x, w, b, None, problem.stride, problem.padding)
    ours = ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, relu=True, backend="triton")
    cudnn = torch.relu(F.conv2d(x, w, b.to(dtype), problem.stride, problem.padding))
    assert (ours.double() - ref).abs().max() <= 2 * (cudnn.double() - ref).abs().max()


# Every layer in bfloat16 and float16 at batch 1 and 8, every fourth in float32 (TF32) at batch 8.
CUDA_CASES = [
    pytest.param(problem, dtype, batch, id=f"{name}-{str(dtype)[6:]}-b{batch}")
    for i, (problem, name) in enumerate(PROBLEMS.items())
    for dtype, batch in ([(torch.bfloat16, 1), (torch.bfloat16, 8), (torch.float16, 1), (torch.float16, 8)]
                         + ([(torch.float32, 8)] if i % 4 == 0 else []))
]


@pytest.mark.usefixtures("needs_cutlass")
@pytest.mark.parametrize("problem, dtype, batch", CUDA_CASES)
def test_cuda_every_layer(problem, dtype, batch):
    # The CUTLASS kernel on every layer (the C=3 stems through channel padding), with a residual on
    # the 1x1 layers (the bottleneck's expansion) and without on the others.
    torch.manual_seed(0)
    x, w, b, res, out = make_problem(problem, batch, dtype)
    res = res if problem.R == 1 else None
    ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True, out=out,
               backend="cuda")
    assert_close_to_reference(out, reference_conv2d(x, w, b, res, problem.stride, problem.padding), tolerance_kind(dtype))


@pytest.mark.usefixtures("needs_cutlass")
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("k", [40, 64, 96, 256])
@pytest.mark.parametrize("kernel", [3, 1], ids=["3x3", "1x1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_choice_and_epilogues(dtype, kernel, k, relu):
    # K = 40 and 64 run the fprop's 64-wide tile with ReLU and its 128-wide one without; 96 and 256
    # the 128-wide fprop, except 1x1 with ReLU: the ping-pong GEMM (ops.cuda_conv2d_kernel), which
    # is also run with the fprop forced (the schedule the conv benchmark's cuda_fprop times). Each
    # with a residual and without; the profiler shows that the kernel that ran is the one named:
    # CUTLASS's conv or GEMM kernel, with the named tile width in its wgmma shape.
    torch.manual_seed(0)
    x = torch.randn(3, 64, 15, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, 64, kernel, kernel, device="cuda") / (64 * kernel * kernel) ** 0.5
    w = w.to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(k, device="cuda")
    padding = (kernel // 2, kernel // 2)
    gemm = "gemm" in ops.cuda_conv2d_kernel(dtype, k, (kernel, kernel), (1, 1), padding, relu)
    for schedule in ("auto", "fprop") if gemm else ("auto",):
        name = ops.cuda_conv2d_kernel(dtype, k, (kernel, kernel), (1, 1), padding, relu, schedule)
        cutlass_kernel, width = ("GemmUniversal" if "gemm" in name else "ConvUniversal"), name.split("x")[-2]
        for residual in (None, torch.randn(3, k, 15, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)):
            out = torch.full((3, k, 15, 13), float("nan"), device="cuda", dtype=dtype)
            out = out.contiguous(memory_format=torch.channels_last)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                if schedule == "auto":  # the public op
                    ops.conv2d(x, w, b, padding=padding, residual=residual, relu=relu, out=out, backend="cuda")
                else:
                    ops._conv2d_cuda(x, w, b, residual, out, (1, 1), padding, (1, 1), relu, schedule)
                torch.cuda.synchronize()
            expected = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
            expected = expected + residual.double() if residual is not None else expected
            assert_close_to_reference(out, torch.relu(expected) if relu else expected, "conv")
            ran = [event.name for event in profile.events() if "ConvUniversal" in event.name or "GemmUniversal" in event.name]
            assert ran and all(cutlass_kernel in ran_name and f"MMA_64x{width}x16" in ran_name for ran_name in ran), ran


@pytest.mark.usefixtures("needs_cutlass")
@pytest.mark.parametrize("kernel", [1, 3], ids=["1x1", "3x3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_nan_float32_and_current_stream(dtype, kernel):
    """The CUTLASS epilogue leaves NaN in one input pixel as NaN through bias, residual and ReLU,
    as torch.relu does, with and without each; float32 runs as TF32 (both ReLU forms); and the
    kernel runs on the current stream: on a side stream, behind a sleep and the copy that fills
    its input, a launch on any other stream would read the zeros that were there before."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, 15, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    x[1, :, 4, 5] = float("nan")
    w = (torch.randn(96, 64, kernel, kernel, device="cuda") / (64 * kernel * kernel) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(96, device="cuda")
    res = torch.randn(3, 96, 15, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    padding = (kernel // 2, kernel // 2)
    side = torch.cuda.Stream()
    for relu in (False, True):
        for residual in (None, res):
            x_side = torch.zeros_like(x)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(20_000_000)  # about 10 ms
                x_side.copy_(x)
                y = ops.conv2d(x_side, w, b, padding=padding, residual=residual, relu=relu, backend="cuda")
            side.synchronize()
            expected = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
            expected = expected + residual.double() if residual is not None else expected
            assert y.isnan().any()
            assert_close_to_reference(y, torch.relu(expected) if relu else expected, tolerance_kind(dtype))


@pytest.mark.usefixtures("needs_cutlass")
@pytest.mark.parametrize(
    "dtype, start, extra, residual, kernel",
    [(torch.bfloat16, 8, 16, False, 3), (torch.bfloat16, 8, 16, True, 3), (torch.float32, 4, 8, True, 3),
     (torch.bfloat16, 4, 16, False, 3), (torch.float16, 8, 16, True, 1), (torch.bfloat16, 8, 24, False, 1)],
    ids=["bf16", "bf16-residual", "fp32-pitch-4", "bf16-misaligned-scratch", "f16-1x1-gemm-residual", "bf16-1x1-gemm"],
)
def test_cuda_writes_into_a_channel_slice(dtype, start, extra, residual, kernel):
    # In place when the slice's start and pixel stride are 16-byte aligned (float32: 4 channels),
    # through scratch and a copy otherwise; the channels around the slice stay NaN. The 1x1 cases
    # (K > 64, stride 1) run the GEMM, as GoogLeNet's 1x1 branches do.
    problem = next(p for p in PROBLEMS if p.R == kernel and p.C % 8 == 0 and p.stride == (1, 1) and p.K > 64
                   and (kernel == 3 or p.padding == (0, 0)))
    name = ops.cuda_conv2d_kernel(dtype, problem.K, (problem.R, problem.S), problem.stride, problem.padding, True)
    assert ("gemm-pingpong" in name) == (kernel == 1), name
    x, w, b, res, out = make_problem(problem, 2, dtype)
    res = res if residual else None
    big = torch.full((2, problem.K + extra, *out.shape[2:]), float("nan"), device="cuda", dtype=dtype)
    big = big.contiguous(memory_format=torch.channels_last)
    ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True,
               out=big[:, start : start + problem.K], backend="cuda")
    reference = reference_conv2d(x, w, b, res, problem.stride, problem.padding)
    assert_close_to_reference(big[:, start : start + problem.K], reference, tolerance_kind(dtype))
    assert big[:, :start].isnan().all() and big[:, start + problem.K :].isnan().all()


@pytest.mark.parametrize("kernel", [1, 3], ids=["pointwise-gemm", "3x3-cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_on_gpu(kernel, dtype):
    """The torch backend's two GPU paths (cuBLAS addmm with the bias in cuBLASLt's epilogue for
    1x1 layers; cuDNN then in-place adds otherwise) against float64, with a residual and without,
    and NaN in one pixel propagated through bias and ReLU as torch.relu does."""
    torch.manual_seed(0)
    for residual in (False, True):
        x = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
        x[0, :, 3, 3] = float("nan")
        w = (torch.randn(96, 64, kernel, kernel, device="cuda") / (64 * kernel * kernel) ** 0.5).to(dtype)
        b = torch.randn(96, device="cuda")
        res = torch.randn(4, 96, 14, 14, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
        res = res if residual else None
        out = ops.conv2d(x, w, b, padding=kernel // 2, residual=res, relu=True, backend="torch")
        expected = reference_conv2d(x, w, b, res, (1, 1), (kernel // 2, kernel // 2))
        assert out.isnan().any()
        assert_close_to_reference(out, expected, tolerance_kind(dtype))  # NaN where the reference has NaN


# ---------------------------------------------------------------- the backends built on PyTorch's convolution

# torch_triton (PyTorch's convolution, then one Triton epilogue pass) and cudnn_fused (cuDNN's
# runtime fusion): every distinct layer at batch 2 in bfloat16, every fourth in float16 and float32
# (TF32 where PyTorch's convolutions may use it), a residual on the 1x1 layers; into a
# NaN-filled out= on every other layer, into a new output on the rest.
PYTORCH_CONV_BACKENDS = ("torch_triton", "cudnn_fused")
PYTORCH_CONV_CASES = [
    pytest.param(backend, problem, dtype, i % 2 == 0, id=f"{backend}-{name}-{str(dtype)[6:]}")
    for backend in PYTORCH_CONV_BACKENDS
    for i, (problem, name) in enumerate(PROBLEMS.items())
    for dtype in [torch.bfloat16] + ([torch.float16, torch.float32] if i % 4 == 0 else [])
]


@pytest.mark.parametrize("backend, problem, dtype, into_out", PYTORCH_CONV_CASES)
def test_pytorch_conv_backends_every_layer(backend, problem, dtype, into_out):
    torch.manual_seed(0)
    x, w, b, res, out = make_problem(problem, 2, dtype)
    res = res if problem.R == 1 else None
    y = ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True,
                   out=out if into_out else None, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(y, reference_conv2d(x, w, b, res, problem.stride, problem.padding), tolerance_kind(dtype))


@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", PYTORCH_CONV_BACKENDS)
def test_pytorch_conv_backends_nan_and_layouts(backend, dtype, kernel):
    """NaN in one input pixel comes out as NaN through bias, residual and ReLU, as torch.relu
    leaves it; NCHW and channels_last inputs (and so cuDNN results in either layout), with an NCHW
    residual or none, give a channels_last result."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, 15, 13, device="cuda").to(dtype)
    x[1, :, 4, 5] = float("nan")
    w = (torch.randn(96, 64, kernel, kernel, device="cuda") / (64 * kernel * kernel) ** 0.5).to(dtype)
    b = torch.randn(96, device="cuda")
    res = torch.randn(3, 96, 15, 13, device="cuda").to(dtype)
    padding = (kernel // 2, kernel // 2)
    for layout in ("nchw", "channels_last"):
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for residual in (None, res):
            y = ops.conv2d(xi, w, b, padding=padding, residual=residual, relu=True, backend=backend)
            assert y.is_contiguous(memory_format=torch.channels_last) and y.isnan().any()
            assert_close_to_reference(y, reference_conv2d(x, w, b, residual, (1, 1), padding), "conv")


@pytest.mark.parametrize("backend", PYTORCH_CONV_BACKENDS)
def test_pytorch_conv_backends_write_into_a_channel_slice(backend):
    problem = next(p for p in PROBLEMS if p.R == 3 and p.C == 64 and p.K == 64)
    x, w, b, res, out = make_problem(problem, 2, torch.bfloat16)
    big = torch.full((2, problem.K + 16, *out.shape[2:]), float("nan"), device="cuda", dtype=torch.bfloat16)
    big = big.contiguous(memory_format=torch.channels_last)
    ops.conv2d(x, w, b, stride=problem.stride, padding=problem.padding, residual=res, relu=True,
               out=big[:, 8 : 8 + problem.K], backend=backend)
    expected = reference_conv2d(x, w, b, res, problem.stride, problem.padding)
    assert_close_to_reference(big[:, 8 : 8 + problem.K], expected, "conv")
    assert big[:, :8].isnan().all() and big[:, 8 + problem.K :].isnan().all()
