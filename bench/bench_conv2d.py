"""Fused conv2d benchmarks: every distinct conv layer of ResNet-50 and VGG-16 against cuDNN.

    pytest bench/bench_conv2d.py --benchmark-only [--benchmark-json FILE]

Per layer as cnnfast.optimize runs it (cnnfast.bench.conv_layers: the geometry and the epilogue,
bfloat16, channels_last, batch 256 for ResNet-50 and 64 for VGG-16), each backend computes the
layer with its BatchNorm and its epilogue (the ReLU, the shortcut added before it in a ResNet
block's last conv, neither in a projection shortcut):
- cudnn:        F.conv2d alone (cuDNN's bare convolution: the bar for the fused kernel),
- eager:        F.conv2d -> BatchNorm2d (eval) [-> + residual] -> ReLU, as PyTorch runs a model
                (VGG-16 has no BatchNorm: there F.conv2d with its bias -> ReLU, eager_folded's work),
- eager_folded: F.conv2d with the BN folded into weight and bias [-> + residual] -> ReLU,
- torch:        cnnfast.ops.conv2d(backend="torch") with the folded BN: eager_folded's kernels,
                except on the 1x1 stride-1 layers, which it runs as one cuBLAS GEMM with the bias
                in cuBLASLt's epilogue, then residual and ReLU,
- triton:       cnnfast.ops.conv2d with the folded BN, the residual and the ReLU in its epilogue,
- cuda:         the same on the CUTLASS kernel of cnnfast._C (the C=3 stem padded to 8 channels),
- torch_triton: cnnfast.ops.conv2d(backend="torch_triton"): torch's convolution (or GEMM) without
                the bias, then bias, residual and ReLU in one Triton pass over its result,
- cudnn_fused:  cnnfast.ops.conv2d(backend="cudnn_fused"): cuDNN's runtime-fused conv + bias
                (+ residual) + ReLU, on the layers that end in a ReLU,
- cuda_fprop:   on the 1x1 stride-1 layers where cuda runs a GEMM (K > 64, with a ReLU), the same
                with the CUTLASS implicit-GEMM conv kernel forced: the measurement behind that
                choice (skipped on the other 1x1 layers, where cuda runs that kernel already).
extra_info["kernel"] names what ran on triton (the tuned config), cuda and cuda_fprop (the CUTLASS
kernel and tile) and torch_triton (its epilogue's tuned tile). Before a fused backend is timed on
a layer, its result is compared with eager_folded's, and (once per backend,
cnnfast.bench.relu_keeps_nan, as `cnnfast tune` does) its ReLU is checked to leave NaN as NaN: a
case that fails either is not timed, so the tuning table built from these benchmarks cannot
choose it.
Times come from triton.testing.do_bench (CUDA events, median, L2 flushed before each run);
extra_info has ms, TFLOP/s, GB/s of compulsory traffic, the ratio of cuDNN's bare-conv time to
this backend's time, the percent of the roofline bound (cnnfast.roofline, with this GPU's
measured matmul and copy ceilings) that the layer reaches, and the layer's batch, geometry and
epilogue, from which bench/tuning_table.py picks each layer's backend for backend=None. The
compulsory traffic counts the residual for the backends that add it (not cuDNN's bare conv).
torch.compile is not among the backends here: compiling each of the 80 layers would take more than
the GPU check's budget; `cnnfast bench ARCH --backends compile` times it per layer, and the model
benchmarks time it on ResNet-50.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import cpu_smoke, needs_gpu
from cnnfast import ops
from cnnfast.bench import (
    conv_layers, eager_function, fold_layer, has_batch_norm, kernel_name, layer_function, layer_parts, layer_residual,
    layer_skip_reason, relu_keeps_nan, unfolded_layer,
)
from cnnfast.roofline import ceilings, conv_bytes, conv_flops, roofline_point
from cnnfast.testing import assert_close_to_reference
from cnnfast.tuning import EPILOGUES

BATCH = {"resnet50": 256, "vgg16": 64}


HAS_BATCH_NORM = {arch: has_batch_norm(arch) for arch in BATCH}  # torchvision's vgg16 has none
BACKENDS = ("cudnn", "eager", "eager_folded", "torch", "triton", "cuda", "torch_triton", "cudnn_fused")
# Each checked against eager_folded before timing.
FUSED_BACKENDS = ("torch", "triton", "cuda", "torch_triton", "cudnn_fused", "cuda_fprop")


def pointwise(problem) -> bool:
    return (problem.R, problem.S, problem.stride, problem.padding) == (1, 1, (1, 1), (0, 0))


def problem_cases():
    for arch, batch in BATCH.items():
        for (problem, epilogue), layers in conv_layers(arch).items():
            for backend in BACKENDS + (("cuda_fprop",) if pointwise(problem) else ()):
                if layer_skip_reason(backend, epilogue) is None:
                    yield pytest.param(arch, batch, problem, epilogue, backend, id=f"{arch}.{layers[0]}-b{batch}-{backend}")


@functools.lru_cache(maxsize=1)
def layer_tensors(batch, problem, epilogue, device="cuda"):
    """cnnfast.bench's layer (the same seeded input, weight, BatchNorm and residual as `cnnfast
    bench`) in bfloat16: x, the unfolded weight and BN for the PyTorch paths, the folded weight and
    bias, the residual (None unless the epilogue adds one)."""
    x, raw_weight, bn = layer_parts(problem, batch, torch.bfloat16, device)
    weight, bias = fold_layer(raw_weight, bn, torch.bfloat16, device)
    residual = layer_residual(problem, batch, epilogue, torch.bfloat16, device)
    return x, *unfolded_layer(raw_weight, bn, torch.bfloat16, device), weight, bias, residual


def layer_fn(backend, batch, problem, epilogue, device="cuda", batch_norm=True):
    """The layer on backend; batch_norm=False: eager runs the model's conv with its bias, no BatchNorm."""
    x, raw_weight, bn, weight, bias, residual = layer_tensors(batch, problem, epilogue, device)
    relu = EPILOGUES[epilogue][1]
    if backend == "cudnn":
        return lambda: F.conv2d(x, raw_weight, None, problem.stride, problem.padding)
    if backend == "eager" and batch_norm:
        return eager_function(problem, x, raw_weight, bn, residual, relu)
    if backend == "cuda_fprop":
        def forced_fprop():
            out = ops._empty_conv2d_output(x, weight, problem.stride, problem.padding, (1, 1))
            ops._conv2d_cuda(x, weight, bias, residual, out, problem.stride, problem.padding, (1, 1), relu,
                             schedule="fprop")
            return out

        return forced_fprop
    return layer_function("torch_folded" if backend in ("eager", "eager_folded") else backend, problem, x, weight,
                          bias, residual, relu)


def case_traffic(problem, batch, epilogue, backend) -> int:
    """Compulsory bytes of a bfloat16 case: the shortcut counts where the backend adds it, not for
    cuDNN's bare convolution, which reads none."""
    return conv_bytes(problem, batch, element_size=2, residual=EPILOGUES[epilogue][0] and backend != "cudnn")


@functools.lru_cache(maxsize=None)
def cudnn_ms(batch, problem, epilogue):
    import triton.testing

    # The bare convolution ignores the epilogue; passing the layer's keeps layer_tensors' one entry.
    return triton.testing.do_bench(layer_fn("cudnn", batch, problem, epilogue), warmup=10, rep=50, return_mode="median")


@needs_gpu
@pytest.mark.parametrize("arch, batch, problem, epilogue, backend", list(problem_cases()))
def test_conv2d_layer(benchmark, arch, batch, problem, epilogue, backend):
    import triton.testing

    relu = EPILOGUES[epilogue][1]
    kernel_args = (torch.bfloat16, problem.K, (problem.R, problem.S), problem.stride, problem.padding, relu)
    if backend == "cuda_fprop" and ops.cuda_conv2d_kernel(*kernel_args).startswith("cutlass-fprop"):
        pytest.skip("cuda runs the fprop kernel on this layer already")
    fn = layer_fn(backend, batch, problem, epilogue, batch_norm=HAS_BATCH_NORM[arch])
    if backend in FUSED_BACKENDS:  # a broken kernel is not timed: compare with the folded eager result
        expected = layer_fn("eager_folded", batch, problem, epilogue)()
        assert (fn().float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max() + 1e-2
        if backend != "cuda_fprop":
            assert relu_keeps_nan(backend, torch.device("cuda")), f"{backend}'s ReLU turns NaN into 0"

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=3, rounds=10)
    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    flops, traffic = conv_flops(problem, batch), case_traffic(problem, batch, epilogue, backend)
    point = roofline_point(arch, backend, flops, traffic, ms, ceilings("cuda", torch.bfloat16))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype="bf16", backend=backend, arch=arch,
        shape=[batch, problem.C, problem.H, problem.W, problem.K, problem.R, problem.S, problem.stride[0]],
        batch=batch, problem={"C": problem.C, "H": problem.H, "W": problem.W, "K": problem.K, "R": problem.R,
                              "S": problem.S, "stride": list(problem.stride), "padding": list(problem.padding),
                              "dilation": [1, 1], "epilogue": epilogue},
        ms=ms, tflops=flops / (ms * 1e-3) / 1e12, gbps=traffic / (ms * 1e-3) / 1e9,
        speedup_vs_cudnn=cudnn_ms(batch, problem, epilogue) / ms, percent_of_roofline=point["percent_of_bound"],
        bound_by=point["bound"],
    )
    # The arguments layer_fn passed: lru_cache tells positional from keyword ones.
    x, _, _, weight, bias, residual = layer_tensors(batch, problem, epilogue, "cuda")
    if backend in ("triton", "cuda", "torch_triton"):
        benchmark.extra_info["kernel"] = kernel_name(backend, problem, x, weight, bias, residual, relu)
    elif backend == "cuda_fprop":
        benchmark.extra_info["kernel"] = ops.cuda_conv2d_kernel(*kernel_args, schedule="fprop")


@cpu_smoke
@pytest.mark.parametrize("backend", ["torch", "triton", "torch_triton"])
def test_conv2d_cpu_smoke(benchmark, backend):
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)
    out = benchmark(ops.conv2d, x, w, padding=1, relu=True, backend=backend)
    assert_close_to_reference(out, F.relu(F.conv2d(x.double(), w.double(), padding=1)), "conv")
    benchmark.extra_info.update(device="cpu", backend=backend, dtype="fp32", shape=[1, 16, 8, 8, 16, 3, 3, 1])
