"""Every Triton kernel computes its batch-dependent offsets in int64, proven on the compiled IR
instead of on a 2^31-element tensor (which no CPU test can allocate, nor the interpreter run).

Each kernel is compiled for Hopper (sm_90a) with the arguments its launcher really passes (the
helpers of tests/test_triton_compile.py), and its TTIR is read back:

- strided kernels: every integer value computed from a batch stride argument (sx_n, so_n, ...),
  up to the tt.addptr it offsets, is i64, and at least one such value does offset a pointer. A
  kernel that multiplied the image index by the batch stride in int32, or widened the product
  only after the multiplication, has an i32 value on that path and fails; the conv kernels' output
  and residual pixel strides (so_h, so_w, sr_h, sr_w) are checked the same way, since one image's
  map can pass 2^31 elements;
- add_relu's flat kernel (one index for all N*C*H*W elements): every tt.addptr offset is i64.

conftest sets TRITON_INTERPRET=1, under which triton does not compile, so the compiles run in
subprocesses, one per kernel, each running this file as a script without that variable.
"""
import json
import re
import sys

import pytest
import torch

from tests.test_triton_compile import compile_for_hopper, compile_in_subprocesses, recorded_launch

TIMEOUT_S = 300
F16 = torch.float16
CHANNELS_LAST = torch.channels_last


# ---------------------------------------------------------------- the subprocess side


def recorded(kernel_fn, launch):
    """The (args, kwargs) that `launch()` passes to kernel_fn, whose run is swapped for a recorder."""
    launches = []
    kernel_fn.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    try:
        launch()
    finally:
        del kernel_fn.run
    (args, kwargs), = launches
    return kernel_fn, args, kwargs


# The launches of the memory-bound kernels take a config index and a dtype, so that
# tests/test_triton_compile_memory_bound.py can compile every config with them.


def add_relu_launch(flat: bool, config_index: int = 0, dtype=F16):
    from cnnfast.triton_kernels import add_relu as module

    x = torch.empty(8, 64, 14, 14, dtype=dtype, memory_format=CHANNELS_LAST)
    y = torch.empty_like(x) if flat else torch.empty(8, 64, 14, 14, dtype=dtype)  # NCHW y: the strided kernel
    out = torch.empty_like(x)
    kernel_fn = module.add_relu_flat_kernel if flat else module.add_relu_strided_kernel
    config = (module.add_relu_flat_configs if flat else module.add_relu_strided_configs)(False)[config_index]
    return recorded(kernel_fn, lambda: module.add_relu(x, y, out, True, config=config))


def conv_epilogue_launch(config_index: int = 0, dtype=F16):
    """add_relu's strided kernel as the torch_triton conv's epilogue: a float32 bias, no residual,
    written in place over the convolution's result."""
    from cnnfast.triton_kernels import add_relu as module

    conv_result, bias = torch.empty(8, 64, 14, 14, dtype=dtype, memory_format=CHANNELS_LAST), torch.empty(64)
    config = module.add_relu_strided_configs(False)[config_index]
    return recorded(module.add_relu_strided_kernel,
                    lambda: module.add_relu(conv_result, None, conv_result, True, config=config, bias=bias))


def global_avg_pool_launch(config_index: int = 0, dtype=F16):
    from cnnfast.triton_kernels import global_avg_pool as module

    x = torch.empty(8, 512, 7, 7, dtype=dtype, memory_format=CHANNELS_LAST)
    config = module.global_avg_pool_configs(False)[config_index]
    return recorded(module.global_avg_pool_kernel, lambda: module.global_avg_pool(x, config=config))


def linear_bias_launch(config_index: int = 0, dtype=F16):
    """gap_linear's product (its pooling is the global_avg_pool kernel)."""
    from cnnfast.triton_kernels import gap_linear as module

    pooled, weight, bias = torch.empty(8, 512, dtype=dtype), torch.empty(1000, 512, dtype=dtype), torch.empty(1000)
    config = module.linear_bias_configs(False, float32=dtype == torch.float32)[config_index]
    return recorded(module.linear_bias_kernel, lambda: module.linear_bias(pooled, weight, bias, config=config))


def linear_bias_strided_launch():
    """gap_linear's product with a transposed weight and a strided bias, whose strides are not 1
    (a stride of 1 is a constant in the compiled kernel)."""
    from cnnfast.triton_kernels import gap_linear as module

    pooled, weight, bias = torch.empty(8, 512, dtype=F16), torch.empty(512, 1000, dtype=F16).t(), torch.empty(2000)[::2]
    config = module.linear_bias_configs(False, float32=False)[0]
    return recorded(module.linear_bias_kernel, lambda: module.linear_bias(pooled, weight, bias, config=config))


def conv2d_launch(problem: str, split_k: bool = False):
    from cnnfast.triton_kernels.conv2d import conv2d_configs, split_k_configs

    configs = (split_k_configs if split_k else conv2d_configs)(flat=problem == "flat", interpreted=False)
    return recorded_launch("float16", problem, configs[0])


# The conv kernel's channel and filter-tap strides, which WIDE_OFFSETS multiplies in int64.
WIDE_STRIDES = ("sx_c", "sx_h", "sx_w", "sw_k", "sw_c", "sw_r", "sw_s", "sr_c", "so_c")


def conv2d_wide_launch(flat: bool):
    """The conv kernel launched with WIDE_OFFSETS (as for a 2^31-element image, which wide_offsets
    detects) on views none of whose strides is 1 (a stride of 1 is a constant in the compiled
    kernel, with nothing to widen): every stride argument is then checked."""
    from cnnfast.triton_kernels import conv2d as module

    c, k = (3, 64) if flat else (144, 288)
    x = torch.empty(8, 2 * c, 14, 28, dtype=F16)[:, ::2, :, ::2]
    weight = torch.empty(k, 2 * c, 3, 6, dtype=F16)[:, ::2, :, ::2]
    out, residual = torch.empty(8, k, 14, 14, dtype=F16), torch.empty(8, k, 14, 14, dtype=F16)
    config = module.conv2d_configs(flat=flat, interpreted=False)[0]
    module.wide_offsets = lambda *args: True
    return recorded(module.conv2d_bias_act_kernel, lambda: module.conv2d_bias_act(
        x, weight, torch.empty(k), residual, out, (1, 1), (1, 1), (1, 1), True, config=config))


# The conv epilogue's output-pixel terms, int64 in every conv kernel: one image's map can pass 2^31
# elements (its row and column strides are not 1 in channels_last residual and output).
CONV_PIXEL_STRIDES = ("sr_h", "sr_w", "so_h", "so_w")

# name: (launch, the batch stride arguments; none for the flat kernel, whose every offset is checked)
KERNELS = {
    "conv2d_flat": (lambda: conv2d_launch("flat"), ("sx_n", "sr_n", "so_n", *CONV_PIXEL_STRIDES)),
    "conv2d_channel_blocked": (lambda: conv2d_launch("channel_blocked_masked"),
                               ("sx_n", "sr_n", "so_n", *CONV_PIXEL_STRIDES)),
    "conv2d_split_k": (lambda: conv2d_launch("channel_blocked_masked", split_k=True),
                       ("sx_n", "sr_n", "so_n", *CONV_PIXEL_STRIDES)),
    "add_relu_flat": (lambda: add_relu_launch(flat=True), ()),
    "add_relu_strided": (lambda: add_relu_launch(flat=False), ("sx_n", "sy_n", "so_n")),
    "conv_epilogue": (conv_epilogue_launch, ("sx_n", "so_n")),
    "global_avg_pool": (global_avg_pool_launch, ("sx_n", "so_n")),
    "gap_linear_product": (linear_bias_launch, ("sa_n", "so_n")),
    # Its other strides too (a stride times an index in int32 would wrap as well).
    "gap_linear_product_strided": (linear_bias_strided_launch, ("sa_n", "so_n", "sw_c", "sb_o")),
    # NCHW residual and output: their column stride is 1, a constant.
    "conv2d_flat_wide": (lambda: conv2d_wide_launch(flat=True), ("sx_n", "sr_n", "so_n", "sr_h", "so_h")),
    "conv2d_channel_blocked_wide": (lambda: conv2d_wide_launch(flat=False), ("sx_n", "sr_n", "so_n", "sr_h", "so_h")),
}
WIDE_KERNELS = ("conv2d_flat_wide", "conv2d_channel_blocked_wide")


# ---------------------------------------------------------------- reading the TTIR


class Op:
    def __init__(self, line: str):
        line = line.split(" loc(")[0].strip()
        self.result, rest = (part.strip() for part in line.split("=", 1))
        self.name = rest.split()[0]
        body, _, types = rest.rpartition(" : ")
        self.operands = re.findall(r"%[\w.]+", body)
        self.types = types
        # The result's type is printed last ("i32 to i64", "i64 -> tensor<64xi64>", "tensor<64xi64>").
        self.type = re.split(r" -> | to |, ", types)[-1]

    @property
    def offset_type(self) -> str:  # of a tt.addptr: "pointer type, offset type"
        return self.types.split(", ")[1]


def parse_ops(ttir: str) -> list[Op]:
    return [Op(line) for line in ttir.splitlines() if re.match(r"\s*%[\w.]+ = ", line)]


def is_i64(type_: str) -> bool:
    """i64 or a tensor of i64."""
    return re.search(r"i64>?$", type_) is not None


def batch_offset_problems(ops: list[Op], argument: str) -> list[str]:
    """What is wrong with the offsets computed from one batch stride argument: each integer value
    derived from it (up to the tt.addptr it offsets) that is not i64, or no addptr reached."""
    derived, problems, offsets = {"%" + argument}, [], 0
    for op in ops:  # SSA text is in definition order, so one pass follows every use
        if not derived.intersection(op.operands):
            continue
        if op.name == "tt.addptr":
            offsets += 1
            if not is_i64(op.offset_type):
                problems.append(f"{op.result} = tt.addptr with an {op.offset_type} offset")
            continue
        derived.add(op.result)
        if not is_i64(op.type):
            problems.append(f"{op.result} = {op.name} ... : {op.types}")
    if offsets == 0:
        problems.append(f"no pointer is offset by a value computed from {argument}")
    return problems


def pixel_count_problems(ops: list[Op], argument: str = "N") -> list[str]:
    """The products of a size argument: of the batch size N (the pixel count N * P * Q a row index
    is compared with), or of the height H (the pixels of one map, H * W): each must be i64, and
    there must be one. An i32 product wraps from 2^31 pixels (a large batch of small maps, or one
    expanded map, which has that many pixels without as many bytes), and every row then looks out
    of range, or the loop over a map's pixels ends at once."""
    derived, products = {"%" + argument}, []
    for op in ops:
        if derived.intersection(op.operands) and op.name in ("arith.muli", "arith.extsi", "tt.splat"):
            derived.add(op.result)
            if op.name == "arith.muli":
                products.append(op)
    problems = [f"{op.result} = arith.muli ... : {op.types}" for op in products if not is_i64(op.type)]
    return problems if products else [f"no product of {argument}"]


def flat_offset_problems(ops: list[Op]) -> list[str]:
    addptrs = [op for op in ops if op.name == "tt.addptr"]
    problems = [f"{op.result} = tt.addptr with an {op.offset_type} offset" for op in addptrs if not is_i64(op.offset_type)]
    return problems if addptrs else ["no tt.addptr"]


# ---------------------------------------------------------------- the test side


@pytest.fixture(scope="module")
def ttirs():
    """The TTIR of every kernel in KERNELS, compiled in one subprocess each, all at once."""
    outputs = compile_in_subprocesses(__file__, [(name,) for name in KERNELS], TIMEOUT_S)
    return {name: outputs[(name,)] for name in KERNELS}


@pytest.mark.parametrize("name", KERNELS)
def test_batch_offsets_are_int64(ttirs, name):
    ops = parse_ops(ttirs[name])
    arguments = KERNELS[name][1]
    problems = [f"{argument}: {problem}" for argument in arguments for problem in batch_offset_problems(ops, argument)]
    if not arguments:
        problems = flat_offset_problems(ops)
    assert not problems, f"{name} computes batch-dependent offsets in 32 bits:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", WIDE_KERNELS)
def test_wide_offsets_multiply_every_stride_in_int64(ttirs, name):
    """With WIDE_OFFSETS, each value computed from a channel or filter-tap stride is i64 up to the
    pointer it offsets; without it (the plain channel-blocked kernel) the filter-tap terms are
    32-bit, which the same check sees."""
    ops = parse_ops(ttirs[name])
    problems = [f"{argument}: {problem}" for argument in WIDE_STRIDES for problem in batch_offset_problems(ops, argument)]
    assert not problems, f"{name} computes channel or filter-tap offsets in 32 bits:\n" + "\n".join(problems)
    narrow = parse_ops(ttirs["conv2d_channel_blocked"])
    assert batch_offset_problems(narrow, "sx_h"), "the plain kernel's filter-tap offsets were expected 32-bit"


# The kernels that compare a row index with N times the pixels of an image, or count one image's
# pixels (H * W) for any map. (The convolutions refuse a map of 2^31 output pixels: their
# per-image coordinates are 32-bit by design.)
PIXEL_COUNT_KERNELS = {"conv2d_flat": ("N",), "conv2d_channel_blocked": ("N",), "conv2d_split_k": ("N",),
                       "add_relu_strided": ("N", "H"), "conv_epilogue": ("N", "H"), "global_avg_pool": ("H",)}


@pytest.mark.parametrize("name", PIXEL_COUNT_KERNELS)
def test_pixel_counts_are_int64(ttirs, name):
    ops = parse_ops(ttirs[name])
    problems = [f"{argument}: {problem}" for argument in PIXEL_COUNT_KERNELS[name]
                for problem in pixel_count_problems(ops, argument)]
    assert not problems, f"{name} counts pixels in 32 bits:\n" + "\n".join(problems)


def test_the_check_sees_an_int32_pixel_count():
    narrow = parse_ops("""
    %M = arith.muli %N, %P : i32 loc(#loc1)
    %M_1 = arith.muli %M, %Q : i32 loc(#loc1)
    """)
    assert len(pixel_count_problems(narrow)) == 2
    wide = parse_ops("""
    %N_1 = arith.extsi %N : i32 to i64 loc(#loc1)
    %M = arith.muli %N_1, %P : i64 loc(#loc1)
    """)
    assert pixel_count_problems(wide) == []


def test_the_check_sees_int32_offsets():
    """The checks on a hand-written TTIR fragment that multiplies the image index in int32."""
    narrow = parse_ops("""
    %n = arith.divsi %offs, %pq : tensor<64xi32> loc(#loc1)
    %x = tt.splat %sx_n : i32 -> tensor<64xi32> loc(#loc2)
    %x_1 = arith.muli %n, %x : tensor<64xi32> loc(#loc2)
    %x_2 = arith.extsi %x_1 : tensor<64xi32> to tensor<64xi64> loc(#loc2)
    %x_3 = tt.addptr %x_ptrs, %x_2 : tensor<64x!tt.ptr<f16>>, tensor<64xi64> loc(#loc3)
    %y = tt.addptr %y_ptrs, %offs : tensor<64x!tt.ptr<f16>>, tensor<64xi32> loc(#loc4)
    """)
    assert len(batch_offset_problems(narrow, "sx_n")) == 2  # the splat and the multiplication
    assert len(flat_offset_problems(narrow)) == 1
    assert batch_offset_problems(narrow, "so_n") == ["no pointer is offset by a value computed from so_n"]


if __name__ == "__main__":
    kernel_fn, args, kwargs = KERNELS[sys.argv[1]][0]()
    print(json.dumps(compile_for_hopper(kernel_fn, args, kwargs).asm["ttir"]))
