"""Eager calls of the public ops run their kernels directly; tracing, dispatch and function modes,
the profiler, meta tensors and tensor subclasses go through PyTorch's dispatcher
(ops.dispatcher_needed).

Each test replaces the kernel each op calls directly (ops.Op.kernel) with one that raises. The
registered ops keep the original kernels, so a call that succeeds went through the dispatcher,
and one that raises "direct call" did not."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

from cnnfast import ops

OPS = (ops._conv2d_op, ops._conv2d_out_op, ops._global_avg_pool_op, ops._add_relu_op, ops._gap_linear_op)


class DirectCall(Exception):
    pass


@pytest.fixture
def direct_calls_raise(monkeypatch):
    def refuse(*args, **kwargs):
        raise DirectCall("direct call")

    for op in OPS:
        monkeypatch.setattr(op, "kernel", refuse)


def inputs(device="cpu"):
    x = torch.randn(2, 8, 5, 5, device=device).to(memory_format=torch.channels_last)
    return x, torch.randn(8, 8, 3, 3, device=device), torch.randn(8, device=device), torch.randn(4, 8, device=device)


def every_op(x, weight, bias, linear):
    """Runs each public op once (conv2d with and without out=); returns the results."""
    out = torch.empty(2, 8, 5, 5, device=x.device)
    return [
        ops.conv2d(x, weight, bias, padding=1, relu=True),
        ops.conv2d(x, weight, bias, padding=1, relu=True, out=out),
        ops.global_avg_pool(x),
        ops.add_relu(x, x),
        ops.gap_linear(x, linear),
    ]


# The public call of each op, by the name of the op it reaches.
CALLS = {
    "conv2d": lambda x, w, b, lin: ops.conv2d(x, w, b, padding=1, relu=True),
    "conv2d_out": lambda x, w, b, lin: ops.conv2d(x, w, b, padding=1, out=torch.full((2, 8, 5, 5), float("nan"), device=x.device)),
    "global_avg_pool": lambda x, w, b, lin: ops.global_avg_pool(x),
    "add_relu": lambda x, w, b, lin: ops.add_relu(x, x),
    "gap_linear": lambda x, w, b, lin: ops.gap_linear(x, lin),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_eager_call_runs_the_kernel_directly(direct_calls_raise, call):
    with pytest.raises(DirectCall):
        call(*inputs())
    with torch.no_grad(), pytest.raises(DirectCall):
        call(*inputs())
    with torch.inference_mode(), pytest.raises(DirectCall):
        call(*inputs())


def test_the_fused_modules_parameters_are_plain_tensors_to_it(direct_calls_raise):
    """nn.Parameter disables __torch_function__: a module's weights do not send its calls through
    the dispatcher."""
    x, weight, bias, linear = inputs()
    weight, bias, linear = (torch.nn.Parameter(t, requires_grad=False) for t in (weight, bias, linear))
    with pytest.raises(DirectCall):
        ops.conv2d(x, weight, bias, padding=1)
    with pytest.raises(DirectCall):
        ops.gap_linear(x, linear)


def test_the_direct_calls_give_the_dispatched_results():
    x, weight, bias, linear = inputs()
    direct = every_op(x, weight, bias, linear)
    with torch.profiler.profile():  # the profiler sends every call through the dispatcher
        dispatched = every_op(x, weight, bias, linear)
    for a, b in zip(direct, dispatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op, call", CALLS.items(), ids=CALLS.keys())
def test_the_profiler_sees_the_cnnfast_op(direct_calls_raise, op, call):
    with torch.profiler.profile() as prof:
        call(*inputs())
    assert f"cnnfast::{op}" in {event.name for event in prof.events()}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_function_mode_sees_the_cnnfast_op(direct_calls_raise, call):
    # torch.device(...) as a context manager is a function mode.
    with torch.device("cpu"):
        call(*inputs())


def test_flop_counter_mode_counts_through_the_dispatcher(direct_calls_raise):
    x, weight, bias, linear = inputs()
    with FlopCounterMode(display=False) as counter:
        ops.conv2d(x, weight, bias, padding=1, relu=True)
        ops.gap_linear(x, linear)
    assert counter.get_total_flops() == 2 * 2 * 8 * 5 * 5 * 8 * 3 * 3 + 2 * 2 * 8 * 4


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_meta_tensors_reach_the_fake_implementation(direct_calls_raise, call):
    assert call(*inputs("meta")).device.type == "meta"


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_fake_tensors_reach_the_fake_implementation(direct_calls_raise, call):
    with FakeTensorMode():
        call(*inputs())


def test_make_fx_records_the_cnnfast_ops(direct_calls_raise):
    graph = make_fx(lambda x, w, b, lin: every_op(x, w, b, lin))(*inputs())
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    for op in ("conv2d", "conv2d_out", "global_avg_pool", "add_relu", "gap_linear"):
        assert f"cnnfast.{op}.default" in targets, targets


def test_torch_compile_traces_the_ops(direct_calls_raise):
    compiled = torch.compile(lambda x, w, b, lin: every_op(x, w, b, lin), backend="eager", fullgraph=True)
    x, weight, bias, linear = inputs()
    with torch.no_grad():
        results = compiled(x, weight, bias, linear)
    assert [tuple(r.shape) for r in results] == [(2, 8, 5, 5), (2, 8, 5, 5), (2, 8), (2, 8, 5, 5), (2, 4)]


# Calls of the registered ops themselves (torch.ops.cnnfast.*, as a compiled graph makes them), each
# with one bad argument that a kernel would read out of bounds on or run a backend not asked for.
def conv2d_op(x, weight, bias, residual=None, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
    """torch.ops.cnnfast.conv2d on the torch backend, with ReLU."""
    return torch.ops.cnnfast.conv2d(x, weight, bias, residual, list(stride), list(padding), list(dilation), 1, True,
                                    "torch")


BAD_OP_CALLS = {
    "conv2d-channels": (lambda x, w, b, lin: torch.ops.cnnfast.conv2d(
        x, w[:, :4], b, None, [1, 1], [1, 1], [1, 1], 1, True, "triton"), ValueError, "input has 8 channels"),
    "conv2d-backend": (lambda x, w, b, lin: torch.ops.cnnfast.conv2d(
        x, w, b, None, [1, 1], [1, 1], [1, 1], 1, True, "bogus"), ValueError, "unknown backend 'bogus'"),
    "conv2d-groups": (lambda x, w, b, lin: torch.ops.cnnfast.conv2d(
        x, w[:, :4], b, None, [1, 1], [1, 1], [1, 1], 2, True, "triton"), NotImplementedError, "groups=1 only"),
    "conv2d_out-shape": (lambda x, w, b, lin: torch.ops.cnnfast.conv2d_out(
        x, w, b, None, torch.empty(2, 8, 4, 4), [1, 1], [1, 1], [1, 1], 1, True, "torch"), ValueError,
        "out must have the output's shape"),
    "global_avg_pool-backend": (lambda x, w, b, lin: torch.ops.cnnfast.global_avg_pool(x, "nonsense"), ValueError,
                                "unknown backend 'nonsense'"),
    "global_avg_pool-rank": (lambda x, w, b, lin: torch.ops.cnnfast.global_avg_pool(x[0], "torch"), ValueError,
                             "expected a 4-D"),
    "add_relu-shape": (lambda x, w, b, lin: torch.ops.cnnfast.add_relu(x, x[:, :, :, :1].expand(2, 8, 5, 5)[:, :, :1],
                                                                       True, "triton"), ValueError, "y must have x's shape"),
    "add_relu-backend": (lambda x, w, b, lin: torch.ops.cnnfast.add_relu(x, x, True, "gap"), ValueError,
                         "unknown backend 'gap'"),
    "add_relu-op": (lambda x, w, b, lin: torch.ops.cnnfast.add_relu(x, x, True, "cudnn_fused"), NotImplementedError,
                    "no kernel for this op"),
    "gap_linear-channels": (lambda x, w, b, lin: torch.ops.cnnfast.gap_linear(x, lin[:, :5], None, "triton"),
                            ValueError, "input has 8 channels"),
    # The rest of DESIGN.md's bad-input contract, through the registered ops.
    "conv2d-rank": (lambda x, w, b, lin: conv2d_op(x[0], w, b), ValueError, r"expected a 4-D \(N, C, H, W\) input"),
    "conv2d-kernel-larger": (lambda x, w, b, lin: conv2d_op(x, torch.randn(8, 8, 9, 9, device=x.device), b),
                             ValueError, "kernel 9x9 .* is larger than the padded input 7x7"),
    "conv2d-integer": (lambda x, w, b, lin: conv2d_op(x.int(), w.int(), None), TypeError,
                       "x has dtype torch.int32; supported: float32, float16, bfloat16"),
    "conv2d-dtypes": (lambda x, w, b, lin: conv2d_op(x, w.half(), b), TypeError,
                      "input dtype torch.float32 and weight dtype torch.float16 differ"),
    "conv2d-bias": (lambda x, w, b, lin: conv2d_op(x, w, b[:5]), ValueError, r"bias must have shape \(8,\), got \(5,\)"),
    "conv2d-stride": (lambda x, w, b, lin: conv2d_op(x, w, b, stride=[0, 1]), ValueError, "stride must be >= 1"),
    "conv2d-padding": (lambda x, w, b, lin: conv2d_op(x, w, b, padding=[-1, 1]), ValueError, "padding must be >= 0"),
    "conv2d-dilation": (lambda x, w, b, lin: conv2d_op(x, w, b, dilation=[0, 1]), ValueError, "dilation must be >= 1"),
    "conv2d-residual": (lambda x, w, b, lin: conv2d_op(x, w, b, residual=x[:, :4]), ValueError,
                        "residual must have the output's shape"),
    "conv2d-requires-grad": (lambda x, w, b, lin: conv2d_op(x, w.requires_grad_(), b), RuntimeError,
                             "weight requires grad, but cnnfast ops have no backward"),
    "global_avg_pool-empty": (lambda x, w, b, lin: torch.ops.cnnfast.global_avg_pool(x[:, :, :0], "torch"),
                              ValueError, "H and W must be non-empty"),
    "global_avg_pool-integer": (lambda x, w, b, lin: torch.ops.cnnfast.global_avg_pool(x.long(), "torch"), TypeError,
                                "x has dtype torch.int64"),
    "add_relu-dtypes": (lambda x, w, b, lin: torch.ops.cnnfast.add_relu(x, x.half(), True, "torch"), TypeError,
                        "x dtype torch.float32 and y dtype torch.float16 differ"),
    "gap_linear-bias": (lambda x, w, b, lin: torch.ops.cnnfast.gap_linear(x, lin, b[:3], "torch"), ValueError,
                        r"bias must have shape \(4,\), got \(3,\)"),
    "gap_linear-rank": (lambda x, w, b, lin: torch.ops.cnnfast.gap_linear(x, lin[0], None, "torch"), ValueError,
                        r"expected a 2-D \(out_features, C\) weight"),
}


@pytest.mark.parametrize("call, error, message", BAD_OP_CALLS.values(), ids=BAD_OP_CALLS.keys())
def test_a_call_of_the_registered_op_is_checked_as_the_public_one(call, error, message):
    with pytest.raises(error, match=message):
        call(*inputs())


@pytest.mark.parametrize("call, error, message", BAD_OP_CALLS.values(), ids=BAD_OP_CALLS.keys())
def test_a_call_on_meta_tensors_is_checked_as_a_real_one(call, error, message):
    """Meta tensors go to the op's fake implementation, which runs the same checks: a wrong call
    does not come back with a made-up shape."""
    with torch.device("meta"), pytest.raises(error, match=message):
        call(*inputs("meta"))


def test_a_call_mixing_a_real_and_a_meta_tensor_is_refused():
    x = torch.ones(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.cnnfast.add_relu(x, x.to("meta"), True, "torch")


@pytest.mark.parametrize("call, error, message", BAD_OP_CALLS.values(), ids=BAD_OP_CALLS.keys())
def test_a_fake_tensor_call_is_checked_as_a_real_one(call, error, message):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(error, match=message):
        call(*inputs())


def test_relu_must_be_a_bool():
    x, weight, _, _ = inputs()
    with pytest.raises(TypeError, match="add_relu: relu must be a bool, got None"):
        ops.add_relu(x, x, None)
    with pytest.raises(TypeError, match="conv2d: relu must be a bool, got 'False'"):
        ops.conv2d(x, weight, padding=1, relu="False")
