"""End-to-end model benchmarks: images/s at batch 256 and latency at batch 1, bfloat16, channels_last.

    pytest bench/bench_models.py --benchmark-only [--benchmark-json FILE]

Variants of each model, timed in the same run (triton.testing.do_bench: CUDA events, median):
- eager:         the torchvision model, PyTorch eager (cuDNN conv -> BN -> ReLU (-> add)),
- compile:       torch.compile(mode="max-autotune") of the same model (ResNet-50 at batch 256
                 only: its autotuning takes minutes per model and batch, more than the GPU
                 check's budget allows),
- cnnfast_torch: cnnfast.optimize(model, dtype=bfloat16, backend="torch"): eager with the
                 BatchNorm folded into the convolutions (PyTorch's conv, then bias, residual and
                 ReLU in PyTorch's ops), the baseline that isolates what folding alone gives,
- cnnfast:        cnnfast.optimize(model, dtype=bfloat16): backend=None, each op and conv layer on
                  the backend cnnfast/tuning.json measured fastest on this GPU (what a user gets),
- cnnfast_triton: the same with backend="triton" everywhere,
- cnnfast_cuda:   the same with backend="cuda" (the CUTLASS conv and the hand-written CUDA kernels),
- cnnfast_torch_triton: the same with every conv (and fully connected layer) on backend
                  "torch_triton" (PyTorch's convolution, then one Triton pass for bias, residual
                  and ReLU) and every other op on torch: what the epilogue fusion alone gives,
- cnnfast_cudnn:  the same with every conv (and fully connected layer) that ends in a ReLU on
                  cuDNN's fused convolution (backend="cudnn_fused") and every other op on torch:
                  what cuDNN's own fusion gives the model, whatever the tuning table says,
- cnnfast_graph, cnnfast_triton_graph, cnnfast_torch_triton_graph, cnnfast_cuda_graph: those four
                  captured in a CUDA graph and replayed (batch 1, where launch overhead is most of
                  the time).
extra_info has ms, images/s, the speedup over eager (timed once per model and batch), TFLOP/s
(2 x the model's MACs, cnnfast.analysis, per image) and its percent of the GPU's measured bfloat16
matmul ceiling (cnnfast.roofline).

Every variant starts from one model per architecture, with its BatchNorm statistics drawn at
random (as initialised they are 0 and 1, and folding them would change nothing), and runs one
seeded batch; before it is timed, its logits are checked against the float64 model's on the same
batch (logits_error).
"""
import copy
import functools

import pytest
import torch

import cnnfast
from bench.harness import cpu_smoke, needs_gpu
from cnnfast.analysis import analyze_arch
from cnnfast.models import DEFAULT_INPUT_SIZE, get_model
from cnnfast.roofline import ceilings
from cnnfast.nn import ConvBNReLU, LinearReLU
from tests.test_nn import randomize_bn

ARCHS = ("resnet50", "resnet18", "vgg16", "googlenet", "alexnet")
VARIANTS = ("eager", "cnnfast_torch", "cnnfast", "cnnfast_triton", "cnnfast_torch_triton", "cnnfast_cudnn",
            "cnnfast_cuda")
# The variants that put the conv and linear layers on one conv-only backend, and the rest on torch.
CONV_ONLY_VARIANTS = {"cnnfast_torch_triton": "torch_triton", "cnnfast_cudnn": "cudnn_fused"}
# Batch 1 only:
GRAPH_VARIANTS = ("cnnfast_graph", "cnnfast_triton_graph", "cnnfast_torch_triton_graph", "cnnfast_cuda_graph")
# Order: the CUDA extension's variants after the others (a fault in a kernel that never ran on a
# GPU before would fail every case after it in this process), and torch.compile's case last (its
# autotuning takes minutes; a time limit that cuts it short leaves every other case measured).
CASES = sorted(
    (pytest.param(arch, batch, variant, id=f"{arch}-b{batch}-{variant}")
     for arch in ARCHS
     for batch in (256, 1)
     for variant in VARIANTS + (GRAPH_VARIANTS if batch == 1 else ())),
    key=lambda case: "cuda" in case.values[2],
) + [pytest.param("resnet50", 256, "compile", id="resnet50-b256-compile")]


# A variant's largest logit error may be twice eager bfloat16's (DESIGN's rule for large shapes),
# and at least the tolerance table's bfloat16 atol, both relative to the largest logit; eager's own
# error must stay below EAGER_ERROR_LIMIT (it is 0.3-0.9 % on the CPU at batch 2) for that bar to
# mean anything.
BFLOAT16_ATOL = 1e-2
EAGER_ERROR_LIMIT = 5e-2


@functools.lru_cache(maxsize=None)  # the CUDA variants come back to every model after the others
def plain_model(arch):
    """The float32 CPU model every variant starts from, its BatchNorm statistics drawn at random."""
    torch.manual_seed(0)
    return randomize_bn(get_model(arch))


@functools.lru_cache(maxsize=None)
def eager_model(arch):
    return copy.deepcopy(plain_model(arch)).to("cuda", torch.bfloat16, memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def model_input(arch, batch):
    """The seeded bfloat16 channels_last batch every variant of the model runs, drawn on the GPU."""
    size = DEFAULT_INPUT_SIZE[arch]
    generator = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, 3, size, size, device="cuda", generator=generator)
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def reference_logits(arch, batch):
    """The float64 model's logits on model_input (on the GPU: on a CPU VGG-16 at batch 256 takes minutes)."""
    model = copy.deepcopy(plain_model(arch)).to("cuda", torch.float64)
    with torch.no_grad():
        return model(model_input(arch, batch).double())


@functools.lru_cache(maxsize=None)
def eager_logits(arch, batch):
    with torch.no_grad():
        return eager_model(arch)(model_input(arch, batch))


def logits_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest error of logits against the float64 reference, relative to its largest logit."""
    return ((logits.double() - reference).abs().max() / reference.abs().max()).item()


def check_logits(logits: torch.Tensor, eager_logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(error, eager's error) of a variant's logits (logits_error); AssertionError where eager's
    error passes EAGER_ERROR_LIMIT or the variant's passes twice eager's (at least BFLOAT16_ATOL)."""
    error, eager_error = logits_error(logits, reference), logits_error(eager_logits, reference)
    assert eager_error <= EAGER_ERROR_LIMIT, f"eager bfloat16 is {eager_error:.3g} off float64: no bar to compare with"
    bound = max(2 * eager_error, BFLOAT16_ATOL)
    assert error <= bound, f"logits {error:.3g} off float64 (largest logit = 1), more than {bound:.3g} (eager: {eager_error:.3g})"
    return error, eager_error


def cuda_graph(fn, x):
    """Captures fn(static input) once; the returned callable copies x in and replays."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (and Triton autotuning) outside the capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)

    def replay(inp):
        static_x.copy_(inp)
        graph.replay()
        return static_out

    return replay


def convs_on(model, backend):
    """Puts each fused conv or linear layer on `backend`, a backend of the convolution only, and
    every other fused op on "torch"; for "cudnn_fused" only the layers that end in a ReLU (cuDNN's
    fused op has no form without one)."""
    for module in model.modules():
        if isinstance(module, (ConvBNReLU, LinearReLU)) and (backend != "cudnn_fused" or module.relu):
            module.backend = backend
        elif hasattr(module, "backend"):
            module.backend = "torch"
    return model


def build(arch, batch, variant):
    x = model_input(arch, batch)
    eager = eager_model(arch)
    if variant == "eager":
        return eager, x
    if variant == "compile":  # measured on ResNet-50 at batch 256 only (minutes of autotuning)
        return torch.compile(eager, mode="max-autotune"), x
    eager_variant = variant.removesuffix("_graph")
    backend = {"cnnfast_torch": "torch", "cnnfast_triton": "triton", "cnnfast_cuda": "cuda"}.get(eager_variant)
    fast = cnnfast.optimize(plain_model(arch), dtype=torch.bfloat16, backend=backend).cuda()
    if eager_variant in CONV_ONLY_VARIANTS:
        convs_on(fast, CONV_ONLY_VARIANTS[eager_variant])
    if variant.endswith("_graph"):
        return cuda_graph(fast, x), x
    return fast, x


@needs_gpu
@pytest.mark.parametrize("arch, batch, variant", CASES)
def test_model(benchmark, arch, batch, variant):
    import triton.testing

    fn, x = build(arch, batch, variant)
    with torch.no_grad():
        error, eager_error = check_logits(fn(x), eager_logits(arch, batch), reference_logits(arch, batch))

        def run():
            fn(x)
            torch.cuda.synchronize()

        benchmark.pedantic(run, warmup_rounds=3, rounds=10)
        ms = triton.testing.do_bench(lambda: fn(x), warmup=25, rep=200, return_mode="median")
    flop_per_s = batch * model_flops(arch) / (ms * 1e-3)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype="bf16", backend=variant, arch=arch, shape=[batch, 3],
        ms=ms, images_per_s=batch / (ms * 1e-3), speedup_vs_torch=eager_ms(arch, batch) / ms,
        tflops=flop_per_s / 1e12,
        percent_of_matmul_peak=100 * flop_per_s / ceilings("cuda", torch.bfloat16)["matmul_flop_per_s"],
        logits_error=error, eager_logits_error=eager_error,
    )


@functools.lru_cache(maxsize=None)
def model_flops(arch) -> int:
    """FLOPs of one image at the architecture's default input size: 2 x MACs, as cnnfast.analysis counts."""
    return analyze_arch(arch).totals["flops"]


@cpu_smoke
@pytest.mark.parametrize("variant", ["eager", "cnnfast_torch"])
def test_model_cpu_smoke(benchmark, variant):
    """A small ResNet-18 (10 classes, 32x32 images) on the CPU, eager and optimized, against float64."""
    torch.manual_seed(0)
    plain = randomize_bn(get_model("resnet18", num_classes=10))
    model = plain if variant == "eager" else cnnfast.optimize(plain, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = benchmark(model, x)
        reference = copy.deepcopy(plain).double()(x.double())
    assert logits_error(logits, reference) <= 1e-4  # float32 against float64
    benchmark.extra_info.update(device="cpu", backend=variant, dtype="fp32", arch="resnet18", shape=[2, 3])


@functools.lru_cache(maxsize=None)
def eager_ms(arch, batch):
    """Eager PyTorch's time on the model and batch, the bar of every variant."""
    import triton.testing

    x, model = model_input(arch, batch), eager_model(arch)
    with torch.no_grad():
        return triton.testing.do_bench(lambda: model(x), warmup=25, rep=200, return_mode="median")
