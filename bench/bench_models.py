"""End-to-end model benchmarks: images/s at batch 256 and latency at batch 1, bfloat16, channels_last.

    pytest bench/bench_models.py --benchmark-only [--benchmark-json FILE]

Variants of each model, timed in the same run (triton.testing.do_bench: CUDA events, median):
- eager:         the torchvision model, PyTorch eager (cuDNN conv -> BN -> ReLU (-> add)),
- compile:       torch.compile(mode="max-autotune") of the same model (ResNet-50 at batch 256
                 only: its autotuning takes minutes per model and batch, more than the GPU
                 check's budget allows),
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
extra_info has ms, images/s and the speedup over eager (timed once per model and batch).
"""
import copy
import functools

import pytest
import torch

import cnnfast
from bench.harness import needs_gpu
from cnnfast.models import DEFAULT_INPUT_SIZE, get_model
from cnnfast.nn import ConvBNReLU, LinearReLU

ARCHS = ("resnet50", "resnet18", "vgg16", "googlenet", "alexnet")
VARIANTS = ("eager", "cnnfast", "cnnfast_triton", "cnnfast_torch_triton", "cnnfast_cudnn", "cnnfast_cuda")
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


@functools.lru_cache(maxsize=None)  # the CUDA variants come back to every model after the others
def plain_model(arch):
    """The float32 CPU model every variant starts from."""
    torch.manual_seed(0)
    return get_model(arch).eval()


@functools.lru_cache(maxsize=None)
def eager_model(arch):
    return copy.deepcopy(plain_model(arch)).to("cuda", torch.bfloat16, memory_format=torch.channels_last)


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
    size = DEFAULT_INPUT_SIZE[arch]
    x = torch.randn(batch, 3, size, size, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    eager = eager_model(arch)
    if variant == "eager":
        return eager, x
    if variant == "compile":  # measured on ResNet-50 at batch 256 only (minutes of autotuning)
        return torch.compile(eager, mode="max-autotune"), x
    eager_variant = variant.removesuffix("_graph")
    backend = {"cnnfast_triton": "triton", "cnnfast_cuda": "cuda"}.get(eager_variant)
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
        expected = eager_model(arch)(x).float()
        got = fn(x).float()
        # bfloat16 through a whole network: agree to a few percent of the logits' scale.
        assert (got - expected).abs().max() <= 5e-2 * expected.abs().max() + 5e-2

        def run():
            fn(x)
            torch.cuda.synchronize()

        benchmark.pedantic(run, warmup_rounds=3, rounds=10)
        ms = triton.testing.do_bench(lambda: fn(x), warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype="bf16", backend=variant, arch=arch, shape=[batch, 3],
        ms=ms, images_per_s=batch / (ms * 1e-3), speedup_vs_torch=eager_ms(arch, batch) / ms,
    )


@functools.lru_cache(maxsize=None)
def eager_ms(arch, batch):
    """Eager PyTorch's time on the model and batch, the bar of every variant."""
    import triton.testing

    size = DEFAULT_INPUT_SIZE[arch]
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    model = eager_model(arch)
    with torch.no_grad():
        return triton.testing.do_bench(lambda: model(x), warmup=25, rep=200, return_mode="median")
