"""backend=None: the tuning table and the rule that builds it from committed GPU results."""
import json
import os
import re
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfast
import cnnfast.nn
from bench.tuning_table import build_table
from cnnfast import ops, tuning
from cnnfast.backends import backends_of, resolve_backend
from cnnfast.testing import assert_close_to_reference


@pytest.fixture
def fresh_tables():
    """Empties the table caches before and after a test that fakes a table or a local file
    (after: before the test's monkeypatching is undone, so nothing it read stays cached)."""
    tuning._table_at.cache_clear()
    tuning._layer_backend.cache_clear()
    yield
    tuning._table_at.cache_clear()
    tuning._layer_backend.cache_clear()


def test_committed_table_is_the_one_the_results_give():
    assert json.loads(tuning.TABLE_PATH.read_text()) == build_table()


def test_table_entries_name_real_backends():
    for by_op in tuning.tuning_table().values():
        for op, dtypes in by_op.items():
            if op == tuning.CONV_LAYERS:
                choices = {c for layers in dtypes.values() for batches in layers.values() for c in batches.values()}
                assert choices <= set(backends_of("conv2d"))
            else:
                assert set(dtypes.values()) <= set(backends_of(op)) - {"torch"}


def test_cpu_and_meta_tensors_default_to_torch():
    for device in ("cpu", "meta"):
        assert resolve_backend("add_relu", torch.empty(1, device=device), None) == "torch"


def test_gpu_default_comes_from_the_table(monkeypatch):
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: {"NVIDIA H200": {"add_relu": {"bfloat16": "triton"}}})

    shape = (8, 64, 56, 56)
    assert tuning.default_backend("add_relu", FakeCudaTensor(shape)) == "triton"
    assert tuning.default_backend("gap_linear", FakeCudaTensor(shape)) == "torch"
    assert tuning.default_backend("add_relu", FakeCudaTensor(shape, torch.float16)) == "torch"


def write_run(folder, cases):
    """A benchmarks.json with one case per (name, backend, speedup) in `cases`, bf16 on an H200."""
    folder.mkdir()
    benchmarks = [{"name": f"{name}[case{i}]", "extra_info": {"device": "NVIDIA H200", "dtype": "bf16",
                                                             "backend": backend, field: speedup}}
                  for i, (name, field, backend, speedup) in enumerate(cases)]
    (folder / "benchmarks.json").write_text(json.dumps({"benchmarks": benchmarks}))


def test_table_rule_every_case_faster_and_newest_run_wins(tmp_path):
    gap, conv = ("test_gap_linear_gpu", "speedup_vs_torch"), ("test_conv2d_layer", "speedup_vs_cudnn")
    write_run(tmp_path / "h200-2026-01-01-run1", [
        (*gap, "triton", 0.2), (*gap, "triton", 0.3),  # the old kernel: slower than torch
        (*conv, "triton", 1.2), (*conv, "triton", 0.9),  # faster on one layer only: stays on torch
        (*conv, "eager", 2.0),  # a PyTorch path of the benchmark, never a choice
        (*conv, "cuda_fprop", 1.5), (*conv, "cuda_fprop", 1.6),  # a forced schedule, not a backend of the op
    ])
    write_run(tmp_path / "h200-2026-02-01-run1", [
        (*gap, "triton", 1.1), (*gap, "triton", 1.3), (*gap, "cuda", 1.2), (*gap, "cuda", 1.25),
    ])
    # gap_linear: the newer run replaces the old Triton figures; then both backends beat torch in
    # every case and CUDA's median (1.225) beats Triton's (1.2). The convolution stays on torch.
    assert build_table(tmp_path) == {"NVIDIA H200": {"gap_linear": {"bfloat16": "cuda"}}}


def test_a_backend_no_faster_than_torch_somewhere_and_torch_itself_are_no_choice(tmp_path):
    """The rule is every case faster: a speedup of exactly 1 is not. PyTorch's own backend is the
    baseline, never an entry, however its noisy ratio to itself came out."""
    gap = ("test_gap_linear_gpu", "speedup_vs_torch")
    write_run(tmp_path / "h200-2026-01-01-run1", [(*gap, "triton", 1.0), (*gap, "triton", 1.5),
                                                  (*gap, "torch", 1.2), (*gap, "torch", 1.2)])
    assert build_table(tmp_path) == {}
    write_run(tmp_path / "h200-2026-01-02-run1", [(*gap, "triton", 1.1), (*gap, "triton", 1.1),
                                                  (*gap, "torch", 1.2), (*gap, "torch", 1.2)])
    assert build_table(tmp_path) == {"NVIDIA H200": {"gap_linear": {"bfloat16": "triton"}}}


def test_runs_order_by_date_then_run_number(tmp_path):
    gap = ("test_gap_linear_gpu", "speedup_vs_torch")
    # Folder names alone would sort run10 before run2, and its older figures would win.
    write_run(tmp_path / "h200-2026-03-01-run2", [(*gap, "triton", 0.5)])
    write_run(tmp_path / "h200-2026-03-01-run10", [(*gap, "triton", 1.5)])
    write_run(tmp_path / "h200-2026-02-28-run11", [(*gap, "triton", 0.4)])
    assert build_table(tmp_path) == {"NVIDIA H200": {"gap_linear": {"bfloat16": "triton"}}}


def write_layer_run(folder, cases):
    """A benchmarks.json of conv layer cases: (C, H, K, R, stride, batch, backend, ms)."""
    folder.mkdir()
    benchmarks = []
    for c, h, k, r, stride, batch, backend, ms in cases:
        problem = {"C": c, "H": h, "W": h, "K": k, "R": r, "S": r, "stride": [stride, stride],
                   "padding": [r // 2, r // 2], "dilation": [1, 1], "epilogue": "relu"}
        benchmarks.append({"name": f"test_conv2d_layer[l{c}-{h}-{k}-{r}-b{batch}-{backend}]", "extra_info": {
            "device": "NVIDIA H200", "dtype": "bf16", "backend": backend, "ms": ms, "batch": batch,
            "problem": problem, "speedup_vs_cudnn": 0.5}})
    (folder / "benchmarks.json").write_text(json.dumps({"benchmarks": benchmarks}))


def test_layer_rule_picks_the_fastest_backend_per_layer_and_batch(tmp_path):
    write_layer_run(tmp_path / "h200-2026-04-01-run1", [
        (64, 56, 64, 3, 1, 256, "torch", 1.00), (64, 56, 64, 3, 1, 256, "triton", 0.80),
        (64, 56, 64, 3, 1, 256, "cuda", 0.70), (64, 56, 64, 3, 1, 256, "cudnn", 0.60),  # bare conv: not a choice
        (64, 56, 64, 3, 1, 256, "eager_folded", 0.65),  # a PyTorch baseline of the benchmark: not a choice
        (64, 56, 256, 1, 1, 256, "torch", 1.00), (64, 56, 256, 1, 1, 256, "cuda", 0.98),  # within 3 %
        (64, 56, 256, 1, 1, 256, "cudnn_fused", 0.90),  # cuDNN's fused conv is a choice too
        (256, 56, 128, 1, 2, 256, "triton", 0.5),  # torch not timed: no decision
    ])
    write_layer_run(tmp_path / "h200-2026-04-02-run1", [
        (64, 56, 64, 3, 1, 256, "cuda", 1.20),  # CUDA measured again, slower: Triton wins now
        (64, 56, 64, 3, 1, 8, "torch", 0.05), (64, 56, 64, 3, 1, 8, "triton", 0.04),
    ])
    layers = build_table(tmp_path)["NVIDIA H200"][tuning.CONV_LAYERS]["bfloat16"]
    key3x3 = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    key1x1 = tuning.conv2d_layer_key(64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), "relu")
    assert layers == {key3x3: {"256": "triton", "8": "triton"}, key1x1: {"256": "cudnn_fused"}}
    assert "conv2d" not in build_table(tmp_path)["NVIDIA H200"]  # no backend beat bare cuDNN everywhere


class FakeCudaTensor:
    """What default_backend reads of a CUDA tensor: device, dtype, shape."""

    def __init__(self, shape, dtype=torch.bfloat16):
        self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, torch.Size(shape)


def test_conv_default_looks_up_the_layer_at_the_nearest_batch(monkeypatch, fresh_tables):
    key = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    table = {"NVIDIA H200": {"conv2d": {"bfloat16": "triton"},
                             tuning.CONV_LAYERS: {"bfloat16": {key: {"256": "cuda", "8": "torch"}}}}}
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    layer = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu")
    batches = (1, 2, 16, 32, 64, 200, 1024, 1025)
    choice = {n: tuning.default_backend("conv2d", FakeCudaTensor((n, 64, 56, 56)), layer) for n in batches}
    # 2, 16 and 32 are within 4x of 8 (and 32 nearer 8 than 256); 64 is nearer 256; 1 (8x
    # below 8) and 1025 (past 4 x 256) are too far from any measured batch: the op's entry.
    assert choice == {1: "triton", 2: "torch", 16: "torch", 32: "torch", 64: "cuda", 200: "cuda", 1024: "cuda",
                      1025: "triton"}
    other_layer = ((64, 64, 3, 3), (2, 2), (1, 1), (1, 1), "relu")  # not measured: the op's entry
    assert tuning.default_backend("conv2d", FakeCudaTensor((256, 64, 56, 56)), other_layer) == "triton"
    assert tuning.default_backend("conv2d", FakeCudaTensor((256, 64, 56, 56), torch.float16), layer) == "torch"


def test_equally_near_batches_pick_the_smaller(monkeypatch, fresh_tables):
    key = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    # "32" sorts before "8" as text: the tie at 16 must not follow the file's key order.
    table = {"NVIDIA H200": {tuning.CONV_LAYERS: {"bfloat16": {key: {"32": "cuda", "8": "triton"}}}}}
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    layer = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu")
    assert tuning.default_backend("conv2d", FakeCudaTensor((16, 64, 56, 56)), layer) == "triton"


def test_a_non_square_layer_is_found_by_its_height_and_width(monkeypatch, fresh_tables):
    """A benchmark's 28x56 layer (its result's H and W) is the lookup's (N, C, 28, 56) call, not
    the (N, C, 56, 28) one."""
    from cnnfast.bench import layer_choices

    result = bench_result("NVIDIA H200", 8, [{"torch": 1.0, "cuda": 0.5}])
    result["layers"][0]["problem"].update(H=28, W=56)
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: layer_choices(result))
    layer = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu")
    assert tuning.default_backend("conv2d", FakeCudaTensor((8, 64, 28, 56)), layer) == "cuda"
    assert tuning.default_backend("conv2d", FakeCudaTensor((8, 64, 56, 28)), layer) == "torch"


def test_conv_default_follows_the_epilogue_of_the_call(monkeypatch, fresh_tables):
    """One geometry, three epilogues measured apart: a call finds its own epilogue's choice, and
    one not measured (residual without ReLU) the op's entry, never another epilogue's."""
    geometry = (64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1))
    layers = {tuning.conv2d_layer_key(*geometry, "relu"): {"256": "triton"},
              tuning.conv2d_layer_key(*geometry, "residual+relu"): {"256": "cuda"},
              tuning.conv2d_layer_key(*geometry, "none"): {"256": "torch"}}
    table = {"NVIDIA H200": {"conv2d": {"bfloat16": "torch_triton"}, tuning.CONV_LAYERS: {"bfloat16": layers}}}
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    x = FakeCudaTensor((256, 64, 56, 56))
    chosen = {epilogue: tuning.default_backend("conv2d", x, ((256, 64, 1, 1), (1, 1), (0, 0), (1, 1), epilogue))
              for epilogue in tuning.EPILOGUES}
    assert chosen == {"relu": "triton", "residual+relu": "cuda", "none": "torch", "residual": "torch_triton"}


def test_float32_convolutions_are_looked_up_in_the_precision_they_run_in(monkeypatch, fresh_tables):
    """Layer choices measured with float32 as TF32 and as IEEE float32 are kept apart (a result
    says which it timed: "tf32"), and a call finds the one of cuDNN's current setting."""
    from cnnfast.bench import layer_choices

    ieee, tf32 = ({**bench_result("NVIDIA H200", 8, [times]), "dtype": "fp32", "tf32": on}
                  for times, on in (({"torch": 1.0, "triton": 0.5}, False), ({"torch": 1.0, "cuda": 0.5}, True)))
    table = tuning.merged(layer_choices(ieee), layer_choices(tf32))
    key = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    assert table["NVIDIA H200"][tuning.CONV_LAYERS] == {"float32": {key: {"8": "triton"}},
                                                        "float32 as tf32": {key: {"8": "cuda"}}}
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    layer, x = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu"), FakeCudaTensor((8, 64, 56, 56), torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tuning.default_backend("conv2d", x, layer) == "cuda"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert tuning.default_backend("conv2d", x, layer) == "triton"
    assert tuning.conv_dtype_key(torch.bfloat16, True) == "bfloat16"
    # Older results have no "tf32": on a GPU they ran under cuDNN's default, TF32.
    from cnnfast.bench import ran_as_tf32

    old = {key: value for key, value in tf32.items() if key != "tf32"}
    assert ran_as_tf32({**old, "device_type": "cuda"}) and not ran_as_tf32({**old, "device_type": "cpu"})
    assert ran_as_tf32({"device": "NVIDIA H200"}) and not ran_as_tf32({"device": "cpu"})


def test_conv2d_asks_the_table_for_its_own_epilogue(monkeypatch):
    asked = []
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: asked.append(layer) or "torch")
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
    residual = torch.randn(1, 4, 3, 3)
    for kwargs in ({}, {"relu": True}, {"residual": residual}, {"residual": residual, "relu": True}):
        ops.conv2d(x, w, **kwargs)
    assert [layer[-1] for layer in asked] == ["none", "relu", "residual", "residual+relu"]
    assert asked[0][:-1] == ((4, 8, 3, 3), (1, 1), (0, 0), (1, 1))


def test_epilogue_names_and_keys():
    assert {tuning.epilogue_name(*parts): name for name, parts in tuning.EPILOGUES.items()} == {
        name: name for name in tuning.EPILOGUES}
    key = tuning.conv2d_layer_key(64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), "residual+relu")
    assert key == "c64 h56 w56 k256 r1 s1 stride1x1 pad0x0 dil1x1 residual+relu"
    with pytest.raises(ValueError, match="unknown conv epilogue 'gelu'"):
        tuning.conv2d_layer_key(64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), "gelu")


def conv_default_recorder(monkeypatch, table):
    """Makes backend=None's lookup table(batch) for every call (as a GPU's table would), and
    returns (asked, ran): the batches the lookup was given and the backends the conv layers ran."""
    asked = []
    monkeypatch.setattr("cnnfast.backends.default_backend",
                        lambda op, x, layer=None: asked.append(x.shape[0]) or table(op, x.shape[0]))
    return asked, conv_backends_run(monkeypatch)


def conv_backends_run(monkeypatch) -> list:
    """The backends the conv layers run, recorded as each call reaches them."""
    ran = []
    dispatch = ops._conv2d_dispatch
    monkeypatch.setattr(ops, "_conv2d_dispatch", lambda *args: ran.append(args[-1]) or dispatch(*args))
    return ran


def by_batch(op, batch):  # a table that measured torch_triton fastest for convs from batch 4 up
    return "torch_triton" if op == "conv2d" and batch >= 4 else "torch"


def test_the_default_backend_is_chosen_when_the_kernel_runs_under_torch_compile(monkeypatch):
    """backend=None reaches the op as "auto", and its kernel asks the table with the real sizes when
    it runs: a compiled graph keeps its batch dynamic (no recompile for a new batch), and each batch
    still runs its own choice."""
    asked, ran = conv_default_recorder(monkeypatch, by_batch)
    weight = torch.randn(4, 3, 3, 3)

    @torch.compile(fullgraph=True, backend="eager", dynamic=True)
    def layer(x):
        return ops.conv2d(x, weight, relu=True)

    torch.compiler.reset()
    for n in (2, 3, 5, 6):
        x = torch.randn(n, 3, 6, 6)
        with torch._dynamo.config.patch(error_on_recompile=n != 2):
            y = layer(x)
        assert_close_to_reference(y, torch.relu(F.conv2d(x.double(), weight.double())), "conv")
    assert asked == [2, 3, 5, 6] and ran == ["torch", "torch", "torch_triton", "torch_triton"]


@pytest.mark.gpu
def test_on_a_gpu_the_tables_choice_follows_the_batch_of_a_compiled_layer(monkeypatch, fresh_tables):
    """The real lookup on CUDA tensors: a layer measured at batch 2 (torch) and 8 (triton) runs each
    batch on its entry, through one dynamic graph."""
    ran = conv_backends_run(monkeypatch)
    key = tuning.conv2d_layer_key(16, 6, 6, 16, 3, 3, (1, 1), (0, 0), (1, 1), "relu")
    table = {"cnnfast-test-gpu": {tuning.CONV_LAYERS: {"bfloat16": {key: {"2": "torch", "8": "triton"}}}}}
    monkeypatch.setattr(tuning, "_device_name", lambda index: "cnnfast-test-gpu")
    monkeypatch.setattr(tuning, "tuning_table", lambda: table)
    weight = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.bfloat16)

    @torch.compile(fullgraph=True, backend="eager", dynamic=True)
    def layer(x):
        return ops.conv2d(x, weight, relu=True)

    torch.compiler.reset()
    for n in (2, 3, 8, 9):
        x = torch.randn(n, 16, 6, 6, device="cuda", dtype=torch.bfloat16)
        with torch._dynamo.config.patch(error_on_recompile=n != 2):
            y = layer(x)
        assert_close_to_reference(y, torch.relu(F.conv2d(x.double(), weight.double())), "conv")
    assert ran == ["torch", "torch", "triton", "triton"]


def test_the_default_backend_keeps_an_exported_batch_dynamic(monkeypatch):
    asked, ran = conv_default_recorder(monkeypatch, by_batch)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    nn.init.uniform_(plain[1].running_var, 0.5, 2.0)
    model = cnnfast.nn.ConvBNReLU.from_modules(*plain)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 3, 6, 6),), dynamic_shapes={"x": {0: batch}})
    assert asked == []  # nothing was looked up while tracing
    for n in (1, 5):
        x = torch.randn(n, 3, 6, 6)
        assert_close_to_reference(program.module()(x), plain.double()(x.double()), "conv")
    assert asked == [1, 5] and ran == ["torch", "torch_triton"]


def test_the_registered_ops_take_auto_as_the_default(monkeypatch):
    asked, ran = conv_default_recorder(monkeypatch, by_batch)
    x, w = torch.randn(5, 3, 6, 6), torch.randn(4, 3, 3, 3)
    expected = torch.relu(F.conv2d(x.double(), w.double()))
    assert_close_to_reference(torch.ops.cnnfast.conv2d(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, True, "auto"),
                              expected, "conv")
    assert_close_to_reference(ops.conv2d(x, w, relu=True, backend="auto"), expected, "conv")  # None's synonym
    assert asked == [5, 5] and ran == ["torch_triton", "torch_triton"]
    pooled = torch.ops.cnnfast.global_avg_pool(x, "auto")
    assert_close_to_reference(pooled, x.double().mean((2, 3)), "elementwise")
    assert asked == [5, 5, 5]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; expected one of .*, or None \(or 'auto'\)"):
        cnnfast.optimize(plain, backend="cudnn")
    assert_close_to_reference(cnnfast.optimize(plain, backend="auto")(x), plain.double()(x.double()), "conv")


def test_a_foreign_backend_in_the_table_runs_torch_with_a_warning(monkeypatch):
    from cnnfast import backends

    backends.warn_once.cache_clear()
    monkeypatch.setattr("cnnfast.backends.default_backend", lambda op, x, layer=None: "tensorrt")
    with pytest.warns(UserWarning, match="names backend 'tensorrt' for conv2d, which has no such kernel"):
        assert resolve_backend("conv2d", torch.empty(1), None) == "torch"
    monkeypatch.setattr("cnnfast.backends.default_backend", lambda op, x, layer=None: "cudnn_fused")
    with pytest.warns(UserWarning, match="'cudnn_fused' for add_relu"):
        assert resolve_backend("add_relu", torch.empty(1), None) == "torch"
    backends.warn_once.cache_clear()


def test_asking_for_cuda_under_torch_compile_gives_the_ops_own_error():
    """The extension's op list is a constant to torch.compile (its pybind11 query cannot be traced):
    a compiled call fails with cnnfast's error, as an eager one does, not with a tracing failure."""
    x = torch.randn(1, 4, 3, 3)
    compiled = torch.compile(lambda a: ops.add_relu(a, a, backend="cuda"), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as raised:
        compiled(x)
    text = "".join(traceback.format_exception(raised.value))
    assert "marked as skipped" not in text
    assert "backend 'cuda'" in text  # needs CUDA tensors, or is not built


def test_default_backend_never_picks_a_missing_cuda_extension(monkeypatch):
    monkeypatch.setattr("cnnfast.backends.default_backend", lambda op, x, layer=None: "cuda")
    monkeypatch.setattr("cnnfast.backends.cuda_ops", lambda: ())
    assert resolve_backend("conv2d", torch.empty(1), None) == "torch"
    monkeypatch.setattr("cnnfast.backends.cuda_ops", lambda: ("conv2d",))
    assert resolve_backend("conv2d", torch.empty(1), None) == "cuda"


@pytest.mark.parametrize("table_choice", ["triton", "torch_triton"])
def test_conv_default_keeps_grouped_convolutions_on_torch(monkeypatch, table_choice):
    """Even on torch_triton, which runs groups: the table's key has C/groups channels, so a grouped
    layer would find a dense layer's entry."""
    chosen = []
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend, layer=None: backend or table_choice)
    monkeypatch.setattr(ops, "_conv2d_dispatch", lambda *args: chosen.append(args[-1]) or torch.empty(0))
    ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 4, 3, 3), groups=2)
    ops.conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3))
    assert chosen == ["torch", table_choice]


def bench_result(device, batch, layer_times):
    """A cnnfast.bench/3 result with one 3x3 layer per entry of layer_times ({backend: ms})."""
    layers = [{"layer": f"conv{i}", "problem": {"C": 64, "H": 56 >> i, "W": 56 >> i, "K": 64, "R": 3, "S": 3,
                                                 "stride": [1, 1], "padding": [1, 1], "epilogue": "relu"},
               "results": {backend: {"ms": ms} for backend, ms in times.items()}}
              for i, times in enumerate(layer_times)]
    return {"device": device, "dtype": "bf16", "batch": batch, "layers": layers}


def test_tune_saves_layer_choices_that_backend_none_then_reads(monkeypatch, tmp_path, fresh_tables):
    from cnnfast.bench import layer_choices

    local = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(local))
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H100")
    result = bench_result("NVIDIA H100", 1, [
        {"torch": 1.0, "triton": 0.5, "cuda": 0.6, "torch_folded": 0.1},  # torch_folded is no choice
        {"torch": 1.0, "triton": 0.99},
        {"triton": 0.5},  # torch not timed: left out
    ])
    key0 = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    key1 = tuning.conv2d_layer_key(64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    choices = layer_choices(result)
    assert choices == {"NVIDIA H100": {tuning.CONV_LAYERS: {"bfloat16": {key0: {"1": "triton"}, key1: {"1": "torch"}}}}}
    tuning.save_local_choices(choices)
    tuning.save_local_choices(layer_choices(bench_result("NVIDIA H100", 64, [{"torch": 1.0, "cuda": 0.5}])))
    saved = json.loads(local.read_text())["NVIDIA H100"][tuning.CONV_LAYERS]["bfloat16"]
    assert saved == {key0: {"1": "triton", "64": "cuda"}, key1: {"1": "torch"}}  # merged, batch by batch
    layer = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu")
    assert tuning.default_backend("conv2d", FakeCudaTensor((1, 64, 56, 56)), layer) == "triton"
    assert tuning.default_backend("conv2d", FakeCudaTensor((64, 64, 56, 56)), layer) == "cuda"
    # The packaged table is still read beneath the local one.
    assert tuning.tuning_table()["NVIDIA H200"] == json.loads(tuning.TABLE_PATH.read_text())["NVIDIA H200"]


def test_layer_choices_of_a_real_cpu_run_keep_torch():
    from cnnfast.bench import layer_choices, run_bench

    result = run_bench("resnet18", batch=1, backends=["torch", "torch_folded"], input_size=32, max_layers=2,
                       end_to_end=False)
    (layers,) = layer_choices(result)[result["device"]][tuning.CONV_LAYERS].values()
    assert len(layers) == 2 and all(by_batch == {"1": "torch"} for by_batch in layers.values())


def test_tune_refuses_a_machine_without_gpu(capsys, monkeypatch):
    from cnnfast import bench, cli

    monkeypatch.setattr(bench, "default_device", lambda: torch.device("cpu"))
    assert cli.main(["tune", "resnet18"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("table", ["", os.devnull, "directory", "in-proc", "under-a-file", "lock-not-a-file"])
def test_tune_refuses_a_table_it_cannot_save_before_measuring(capsys, monkeypatch, tmp_path, table):
    """Minutes of measuring are not thrown away at the end: a local table that cannot be written
    is an error first, unless --dry-run saves nothing."""
    from cnnfast import bench, cli

    (tmp_path / "a-file").write_text("")
    (tmp_path / "locked.json.lock").mkdir()  # a lock file save_local_choices could not open
    setting = {"directory": str(tmp_path), "in-proc": "/proc/cnnfast/tuning.json",
               "under-a-file": str(tmp_path / "a-file" / "tuning.json"),
               "lock-not-a-file": str(tmp_path / "locked.json")}.get(table, table)
    monkeypatch.setenv("CNNFAST_TUNING_FILE", setting)
    monkeypatch.setattr(bench, "default_device", lambda: torch.device("cuda"))

    class Measured(Exception):
        pass

    def run_bench(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(bench, "run_bench", run_bench)
    assert cli.main(["tune", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnfast tune: error: ") and "--dry-run prints the choices" in err
    assert ("no local tuning table" in err) if table in ("", os.devnull) else (setting in err)
    with pytest.raises(Measured):  # --dry-run saves nothing, so it goes on to measure
        cli.main(["tune", "resnet18", "--dry-run"])


def test_tune_files_of_a_run_feed_the_layer_table(tmp_path):
    """`cnnfast tune --json` output filed with a run (tune*.json) gives layer choices, newest run first."""
    key0 = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    key1 = tuning.conv2d_layer_key(64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    old, new = tmp_path / "h200-2026-05-01-run1", tmp_path / "h200-2026-05-01-run2"
    for folder, times in ((old, [{"torch": 1.0, "triton": 0.5}, {"torch": 1.0, "cuda": 0.5}]),
                          (new, [{"torch": 1.0, "triton": 1.5}])):  # Triton slower on layer 0 now
        folder.mkdir()
        (folder / "tune_resnet50_b1.json").write_text(json.dumps(bench_result("NVIDIA H200", 1, times)))
    layers = build_table(tmp_path)["NVIDIA H200"][tuning.CONV_LAYERS]["bfloat16"]
    assert layers == {key0: {"1": "torch"}, key1: {"1": "cuda"}}


def test_a_backend_a_newer_run_left_out_is_not_chosen_on_older_figures(tmp_path):
    """Run 2 timed torch and triton on the layer, not cuda (its check failed there): cuda's run-1
    time, the fastest, no longer counts; a run that timed cuda alone (no torch) only updates it."""
    write_layer_run(tmp_path / "h200-2026-04-01-run1", [
        (64, 56, 64, 3, 1, 256, "torch", 1.0), (64, 56, 64, 3, 1, 256, "cuda", 0.5),
        (64, 28, 64, 3, 1, 256, "torch", 1.0), (64, 28, 64, 3, 1, 256, "cuda", 0.5),
    ])
    write_layer_run(tmp_path / "h200-2026-04-01-run2", [
        (64, 56, 64, 3, 1, 256, "torch", 1.0), (64, 56, 64, 3, 1, 256, "triton", 0.9),
        (64, 28, 64, 3, 1, 256, "cuda", 0.6),
    ])
    layers = build_table(tmp_path)["NVIDIA H200"][tuning.CONV_LAYERS]["bfloat16"]
    assert layers[tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")] == {"256": "triton"}
    assert layers[tuning.conv2d_layer_key(64, 28, 28, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")] == {"256": "cuda"}


def test_tune_files_of_schema_2_timed_relu_layers(tmp_path):
    """A `cnnfast tune --json` file of bench schema 2 (no epilogue: every layer timed with a ReLU)
    still feeds the table, under the ReLU layer's key."""
    run = tmp_path / "h200-2026-05-01-run1"
    run.mkdir()
    result = bench_result("NVIDIA H200", 1, [{"torch": 1.0, "triton": 0.5}])
    del result["layers"][0]["problem"]["epilogue"]
    (run / "tune_resnet50_b1.json").write_text(json.dumps(result))
    key = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    assert build_table(tmp_path)["NVIDIA H200"][tuning.CONV_LAYERS]["bfloat16"] == {key: {"1": "triton"}}


def test_a_device_check_folder_fills_the_local_table(monkeypatch, tmp_path, fresh_tables):
    """device_check.sh's benchmarks-table step: the conv benchmarks of its own output folder become
    local layer choices, which backend=None reads at once (the model benchmarks after it)."""
    from bench import tuning_table

    out = tmp_path / "out"
    write_layer_run(out, [(64, 56, 64, 3, 1, 256, "torch", 1.0), (64, 56, 64, 3, 1, 256, "cuda", 0.5)])
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(tmp_path / "local.json"))
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA H200")
    tuning_table.main(["--local", str(out)])
    layer = ((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), "relu")
    assert tuning.default_backend("conv2d", FakeCudaTensor((256, 64, 56, 56)), layer) == "cuda"


def test_tune_table_shows_times_choice_and_kernels():
    from cnnfast.cli import tune_table

    result = bench_result("NVIDIA H100", 1, [{"torch": 1.0, "triton": 0.5, "cuda": 0.6}])
    result["backends"] = ["torch", "triton", "cuda"]
    figures = result["layers"][0]["results"]
    figures["torch"]["kernel"], figures["triton"]["kernel"] = None, "64x64x64-g8-w4-s4-split4"
    figures["cuda"]["kernel"] = "cutlass-fprop-128x64x64"
    headers, rows = tune_table(result)
    assert headers == ("layer", "problem", "torch ms", "triton ms", "cuda ms", "backend=None", "kernels")
    key = tuning.conv2d_layer_key(64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), "relu")
    assert rows == [("conv0", key, "1.000", "0.500", "0.600", "triton",
                     "triton 64x64x64-g8-w4-s4-split4, cuda cutlass-fprop-128x64x64")]


def test_local_table_path_follows_the_environment(monkeypatch, tmp_path):
    # Worked out once per setting and home directory, so a change of either still takes effect.
    monkeypatch.delenv("CNNFAST_TUNING_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    assert tuning.local_table_path() == tmp_path / "a" / ".cache" / "cnnfast" / "tuning.json"
    monkeypatch.setenv("HOME", str(tmp_path / "b"))
    assert tuning.local_table_path() == tmp_path / "b" / ".cache" / "cnnfast" / "tuning.json"
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(tmp_path / "mine.json"))
    assert tuning.local_table_path() == tmp_path / "mine.json"
    monkeypatch.setenv("CNNFAST_TUNING_FILE", "")  # set but empty: no local table
    assert str(tuning.local_table_path()) == os.devnull
    with pytest.raises(ValueError, match="no local tuning table to save to"):
        tuning.save_local_choices({"NVIDIA H200": {"add_relu": {"bfloat16": "triton"}}})


BAD_LOCAL_TABLES = {
    "not-json": ("{", "is not valid JSON"),
    "gpu-entry-a-list": ('{"NVIDIA H200": ["triton"]}', "holds a list, not a dict"),
    "batch-not-a-number": (json.dumps({"NVIDIA H200": {tuning.CONV_LAYERS: {"bfloat16": {"k": {"8x": "triton"}}}}}),
                           "is not {batch: backend}"),
    "op-entry-not-a-name": ('{"NVIDIA H200": {"add_relu": {"bfloat16": 3}}}', "is not a backend name"),
}


@pytest.mark.parametrize("case", list(BAD_LOCAL_TABLES))
def test_a_local_table_it_cannot_use_is_left_out_with_a_warning(case, monkeypatch, tmp_path, fresh_tables):
    text, problem = BAD_LOCAL_TABLES[case]
    path = tmp_path / "tuning.json"
    path.write_text(text)
    monkeypatch.setenv("CNNFAST_TUNING_FILE", str(path))
    with pytest.warns(UserWarning, match=f"local tuning table {path} is left out .*{re.escape(problem)}"):
        assert tuning.tuning_table() == tuning.read_table(tuning.TABLE_PATH)
    choice = {"NVIDIA H200": {"add_relu": {"bfloat16": "triton"}}}
    with pytest.warns(UserWarning, match="was moved to .*tuning.json.unreadable"):
        tuning.save_local_choices(choice)
    assert json.loads(path.read_text()) == choice and (tmp_path / "tuning.json.unreadable").read_text() == text


def test_a_float32_conv_entry_of_the_op_is_filed_by_the_precision_it_ran_in(tmp_path):
    conv = ("test_conv2d_layer", "speedup_vs_cudnn")
    write_run(tmp_path / "h200-2026-01-01-run1", [(*conv, "triton", 1.5), (*conv, "triton", 1.4)])
    path = tmp_path / "h200-2026-01-01-run1" / "benchmarks.json"
    data = json.loads(path.read_text())
    for case in data["benchmarks"]:
        case["extra_info"].update(dtype="fp32", tf32=True)
    path.write_text(json.dumps(data))
    assert build_table(tmp_path) == {"NVIDIA H200": {"conv2d": {"float32 as tf32": "triton"}}}
