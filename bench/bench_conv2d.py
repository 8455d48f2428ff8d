"""Fused conv2d benchmarks: every distinct conv layer of ResNet-50 and VGG-16 against cuDNN.

    pytest bench/bench_conv2d.py --benchmark-only [--benchmark-json FILE]

Per layer (bfloat16, channels_last, batch 256 for ResNet-50 and 64 for VGG-16), each backend
computes the layer with its BatchNorm and ReLU:
- cudnn:        F.conv2d alone (cuDNN's bare convolution: the bar for the fused kernel),
- eager:        F.conv2d -> BatchNorm2d (eval) -> ReLU, three kernels, as PyTorch runs a model,
- eager_folded: F.conv2d with the BN folded into weight and bias -> ReLU,
- triton:       cnnfast.ops.conv2d with the folded BN and the ReLU in its epilogue,
- cuda:         the same on the CUTLASS kernel of cnnfast._C (layers with C and K multiples of 8).
Times come from triton.testing.do_bench (CUDA events, median, L2 flushed before each run);
extra_info has ms, TFLOP/s, GB/s of compulsory traffic, the ratio of cuDNN's bare-conv time to
this backend's time, and the percent of the roofline bound (cnnfast.roofline, with this GPU's
measured matmul and copy ceilings) that the layer reaches.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import cpu_smoke, needs_gpu
from cnnfast import ops
from cnnfast.analysis import analyze_arch, conv_problems
from cnnfast.roofline import ceilings, conv_bytes, conv_flops, roofline_point

BATCH = {"resnet50": 256, "vgg16": 64}
BACKENDS = ("cudnn", "eager", "eager_folded", "triton", "cuda")


def problem_cases():
    for arch, batch in BATCH.items():
        for problem, layers in conv_problems(analyze_arch(arch)).items():
            for backend in BACKENDS:
                yield pytest.param(arch, batch, problem, backend, id=f"{arch}.{layers[0]}-b{batch}-{backend}")


@functools.lru_cache(maxsize=1)
def layer_inputs(batch, problem):
    """Input, conv, eval BN with random statistics, and the folded weight and bias (bf16, cuda)."""
    torch.manual_seed(0)
    x = torch.randn(batch, problem.C, problem.H, problem.W, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(problem.C, problem.K, (problem.R, problem.S), problem.stride, problem.padding, bias=False)
    bn = torch.nn.BatchNorm2d(problem.K)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    weight, bias = ops.fold_bn(conv.weight.detach(), None, bn)
    conv = conv.to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    bn = bn.to("cuda", torch.bfloat16)
    weight = weight.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return x, conv, bn, weight, bias.cuda()


def layer_fn(backend, batch, problem):
    x, conv, bn, weight, bias = layer_inputs(batch, problem)
    stride, padding = problem.stride, problem.padding
    if backend == "cudnn":
        return lambda: F.conv2d(x, conv.weight, None, stride, padding)
    if backend == "eager":
        return lambda: torch.relu(bn(conv(x)))
    if backend == "eager_folded":
        bias_bf16 = bias.to(torch.bfloat16)
        return lambda: torch.relu(F.conv2d(x, weight, bias_bf16, stride, padding))
    return lambda: ops.conv2d(x, weight, bias, stride=stride, padding=padding, relu=True, backend=backend)


@functools.lru_cache(maxsize=None)
def cudnn_ms(batch, problem):
    import triton.testing

    return triton.testing.do_bench(layer_fn("cudnn", batch, problem), warmup=10, rep=50)


@needs_gpu
@pytest.mark.parametrize("arch, batch, problem, backend", list(problem_cases()))
def test_conv2d_layer(benchmark, arch, batch, problem, backend):
    import triton.testing

    if backend == "cuda" and (problem.C % 8 or problem.K % 8):
        pytest.skip("the CUTLASS kernel needs C and K multiples of 8 (16-byte TMA alignment)")
    fn = layer_fn(backend, batch, problem)
    if backend in ("triton", "cuda"):  # a broken kernel is not timed: compare with the folded eager result
        expected = layer_fn("eager_folded", batch, problem)()
        assert (fn().float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max() + 1e-2

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=3, rounds=10)
    ms = triton.testing.do_bench(fn, warmup=10, rep=50)
    flops, traffic = conv_flops(problem, batch), conv_bytes(problem, batch, element_size=2)
    point = roofline_point(arch, backend, flops, traffic, ms, ceilings("cuda", torch.bfloat16))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype="bf16", backend=backend, arch=arch,
        shape=[batch, problem.C, problem.H, problem.W, problem.K, problem.R, problem.S, problem.stride[0]],
        ms=ms, tflops=flops / (ms * 1e-3) / 1e12, gbps=traffic / (ms * 1e-3) / 1e9,
        speedup_vs_cudnn=cudnn_ms(batch, problem) / ms, percent_of_roofline=point["percent_of_bound"],
        bound_by=point["bound"],
    )


@cpu_smoke
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv2d_cpu_smoke(benchmark, backend):
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)
    benchmark(ops.conv2d, x, w, padding=1, relu=True, backend=backend)
    benchmark.extra_info.update(device="cpu", backend=backend, dtype="fp32", shape=[1, 16, 8, 8, 16, 3, 3, 1])
