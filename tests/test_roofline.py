"""The roofline arithmetic on hand-counted layers, the ceilings cache and the CPU timing harness."""
import functools
import json

import pytest
import torch

from cnnfast import roofline
from cnnfast.analysis import ConvProblem
from cnnfast.precision import tf32_allowed
from cnnfast.roofline import (
    bound_kind, bound_seconds, ceilings, conv_bytes, conv_flops, roofline_json, roofline_point, time_ms,
)

# ResNet's 3x3 64->64 conv at 56x56, batch 1, bf16 (2 bytes an element).
CONV = ConvProblem(C=64, H=56, W=56, K=64, R=3, S=3, stride=(1, 1), padding=(1, 1))
MACS = 64 * 56 * 56 * 64 * 3 * 3  # output elements x C x R x S
ELEMENTS = 64 * 56 * 56 + 64 * 64 * 3 * 3 + 64 * 56 * 56  # input + weights + output
COMPUTE_BOUND = {"matmul_flop_per_s": 1e12, "copy_bytes_per_s": 1e11}  # ridge: 10 FLOP/byte
MEMORY_BOUND = {"matmul_flop_per_s": 1e14, "copy_bytes_per_s": 1e11}  # ridge: 1000 FLOP/byte
POINT_KEYS = {"layer", "backend", "flops", "bytes", "intensity", "bound_ms", "bound", "ms", "achieved_flop_per_s",
              "percent_of_bound", "kernel"}
CEILING_KEYS = {"device", "dtype", "tf32", "matmul_flop_per_s", "matmul_op", "matmul_dtype", "copy_bytes_per_s",
                "method", "measured_at"}


def test_flops_and_bytes_of_a_3x3_layer():
    assert MACS == 115_605_504
    assert conv_flops(CONV, batch=1) == 2 * MACS == 231_211_008
    assert conv_bytes(CONV, batch=1, element_size=2) == 2 * ELEMENTS == 876_544
    assert conv_bytes(CONV, batch=1, element_size=2, residual=True) == 2 * (ELEMENTS + 64 * 56 * 56)
    assert conv_bytes(CONV, batch=4, element_size=4) == 4 * (4 * 64 * 56 * 56 * 2 + 64 * 64 * 9)


def test_stride_two_halves_the_output():
    problem = ConvProblem(C=64, H=56, W=56, K=128, R=3, S=3, stride=(2, 2), padding=(1, 1))
    assert conv_flops(problem, batch=2) == 2 * 2 * 128 * 28 * 28 * 64 * 9
    assert conv_bytes(problem, batch=2, element_size=2) == 2 * (2 * 64 * 56 * 56 + 128 * 64 * 9 + 2 * 128 * 28 * 28)


def test_bound_time_and_kind_on_both_sides_of_the_ridge():
    flops, traffic = 231_211_008, 876_544  # intensity 263.8 FLOP/byte
    assert bound_seconds(flops, traffic, COMPUTE_BOUND) == pytest.approx(231.211008e-6)
    assert bound_kind(flops, traffic, COMPUTE_BOUND) == "compute"
    assert bound_seconds(flops, traffic, MEMORY_BOUND) == pytest.approx(8.76544e-6)
    assert bound_kind(flops, traffic, MEMORY_BOUND) == "memory"
    # Just below and just above the ridge of 10 FLOP/byte.
    assert bound_kind(9.9e6, 1e6, COMPUTE_BOUND) == "memory"
    assert bound_kind(10.1e6, 1e6, COMPUTE_BOUND) == "compute"


def test_point_at_half_its_bound():
    point = roofline_point("layer1.0.conv1", "torch", 231_211_008, 876_544, ms=2 * 0.231211008, ceiling=COMPUTE_BOUND)
    assert set(point) == POINT_KEYS
    assert point["intensity"] == pytest.approx(263.777, rel=1e-5)
    assert point["bound_ms"] == pytest.approx(0.231211008)
    assert point["percent_of_bound"] == pytest.approx(50)
    assert point["achieved_flop_per_s"] == pytest.approx(0.5e12)
    assert point["bound"] == "compute"


def test_roofline_json_schema():
    ceiling = {"device": "CPU test", "dtype": "bf16", "tf32": False, "matmul_flop_per_s": 1e12,
               "matmul_op": "torch.matmul", "matmul_dtype": "bf16", "copy_bytes_per_s": 1e11,
               "method": roofline.CEILING_METHOD, "measured_at": "2026-01-01T00:00:00+00:00"}
    point = roofline_point("conv1", "torch", 100, 10, 1.0, ceiling)
    data = json.loads(json.dumps(roofline_json("resnet18", 1, 224, ceiling, [point])))
    assert set(data) == {"schema", "arch", "batch", "input_size", "dtype", "device", "ceilings", "ridge_intensity",
                         "points"}
    assert data["schema"] == "cnnfast.roofline/5"
    assert (data["dtype"], data["device"], data["ridge_intensity"]) == ("bf16", "CPU test", 10)
    assert set(data["ceilings"]) == CEILING_KEYS
    assert [set(p) for p in data["points"]] == [POINT_KEYS]


def test_points_and_rows_name_the_kernel_that_ran():
    from cnnfast.bench import roofline_points
    from cnnfast.roofline import roofline_rows

    result = {"layers": [{"layer": "conv1", "flops": 1000, "bytes": 100, "results": {
        "torch": {"ms": 1.0, "kernel": None}, "cuda": {"ms": 0.5, "kernel": "cutlass-fprop-128x64x64"}}}]}
    points = roofline_points(result, COMPUTE_BOUND)
    assert [(p["backend"], p["kernel"]) for p in points] == [("torch", None), ("cuda", "cutlass-fprop-128x64x64")]
    headers, rows = roofline_rows(points)
    assert headers[-1] == "kernel" and [row[-1] for row in rows] == ["", "cutlass-fprop-128x64x64"]


def test_ceilings_are_measured_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    first = ceilings("cpu", torch.float32)
    assert set(first) == CEILING_KEYS
    assert first["dtype"] == "fp32" and first["device"].startswith("CPU")
    assert first["matmul_flop_per_s"] > 1e8 and first["copy_bytes_per_s"] > 1e8

    def must_not_measure(*args):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(roofline, "measure_ceilings", must_not_measure)
    assert ceilings("cpu", torch.float32) == first
    cached = json.loads((tmp_path / "ceilings.json").read_text())
    assert list(cached.values()) == [first]


def test_a_cached_ceiling_timed_another_way_is_measured_again(tmp_path, monkeypatch):
    # An entry without the current method (a median of a few runs, say, which a busy machine drags
    # down) would put every measured layer above its roof.
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    key = f"{roofline.device_name('cpu')} / fp32"
    stale = {"device": "CPU", "dtype": "fp32", "matmul_flop_per_s": 1.0, "copy_bytes_per_s": 1.0,
             "measured_at": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "ceilings.json").write_text(json.dumps({key: stale}))
    measured = dict(stale, matmul_flop_per_s=2.0, method=roofline.CEILING_METHOD)
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, dtype: measured)
    assert ceilings("cpu", torch.float32) == measured
    assert json.loads((tmp_path / "ceilings.json").read_text()) == {key: measured}


def measurements(monkeypatch, *figures):
    """measure_ceilings replaced by one that returns a ceiling of each matmul figure in turn;
    returns the list of figures it has handed out."""
    handed = []

    def measure(device, dtype):
        handed.append(figures[len(handed)])
        return {"matmul_flop_per_s": handed[-1], "matmul_op": f"op {handed[-1]}", "matmul_dtype": "fp32",
                "copy_bytes_per_s": handed[-1], "method": roofline.CEILING_METHOD}

    monkeypatch.setattr(roofline, "measure_ceilings", measure)
    return handed


@pytest.mark.parametrize("place", ["under-a-file", "in-proc"])
def test_a_cache_that_cannot_be_made_leaves_a_warning_and_keeps_the_ceilings_in_the_process(
        tmp_path, monkeypatch, place):
    (tmp_path / "a-file").write_text("")
    directory = {"under-a-file": str(tmp_path / "a-file" / "cache"), "in-proc": f"/proc/cnnfast-{tmp_path.name}"}[place]
    monkeypatch.setenv("CNNFAST_CACHE_DIR", directory)
    handed = measurements(monkeypatch, 3.0, 1.0)
    with pytest.warns(UserWarning, match=f"cannot use the ceilings cache {directory}/ceilings.json"):
        assert ceilings("cpu", torch.float32)["matmul_flop_per_s"] == 3.0
    assert ceilings("cpu", torch.float32)["matmul_flop_per_s"] == 3.0 and handed == [3.0]  # not measured again
    # Measured again (a point above its roof), a lower figure does not lower the roof, nor rename its op.
    again = roofline.remeasured_ceilings("cpu", torch.float32)
    assert (again["matmul_flop_per_s"], again["matmul_op"], again["copy_bytes_per_s"]) == (3.0, "op 3.0", 3.0)
    assert handed == [3.0, 1.0]


def test_a_cache_that_cannot_be_written_leaves_a_warning_and_keeps_the_ceilings_in_the_process(
        tmp_path, monkeypatch):
    from cnnfast import json_file

    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    handed = measurements(monkeypatch, 2.0)

    def read_only_disk(path, contents):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(json_file, "write_object", read_only_disk)
    with pytest.warns(UserWarning, match="cannot write the ceilings cache .*Read-only file system.* this process only"):
        assert ceilings("cpu", torch.float32)["matmul_flop_per_s"] == 2.0
    assert ceilings("cpu", torch.float32)["matmul_flop_per_s"] == 2.0 and handed == [2.0]
    assert not (tmp_path / "ceilings.json").exists()


def test_ceilings_take_the_fastest_run(monkeypatch):
    # A run slowed by other work must not lower a ceiling: the 10 ms run below is the one that counts.
    clock = iter(t for pair in [(0.0, 0.5), (1.0, 1.01), (2.0, 2.3)] * 10 for t in pair)
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(clock))
    assert roofline.time_ms(lambda: None, "cpu", warmup=0, reps=3, fastest=True) == pytest.approx(10.0)
    clock = iter(t for pair in [(0.0, 0.5), (1.0, 1.01), (2.0, 2.3)] * 10 for t in pair)
    assert roofline.time_ms(lambda: None, "cpu", warmup=0, reps=3) == pytest.approx(300.0)


def test_cpu_timer_is_sane_and_repeatable():
    small, large = (torch.randn(n, n) for n in (512, 1024))  # 8 times the work
    small_ms = time_ms(lambda: small @ small, "cpu")
    large_ms = time_ms(lambda: large @ large, "cpu")
    again_ms = time_ms(lambda: large @ large, "cpu")
    assert 0 < small_ms < large_ms
    assert 1 / 3 < again_ms / large_ms < 3


def test_every_layer_is_numbered_beside_its_first_point_and_coinciding_layers_share_a_label():
    def point(layer, backend, intensity, gflops):
        return {"layer": layer, "backend": backend, "intensity": intensity, "achieved_flop_per_s": gflops * 1e9}

    points = [point("conv1", "torch", 10, 50), point("conv2", "torch", 100, 80),
              point("conv3", "torch", 10.5, 51),  # within a label's size of conv1
              point("conv1", "compile", 10, 20), point("conv4", "compile", 3, 5)]  # conv4: timed on compile only
    layers = ["conv1", "conv2", "conv3", "conv4"]
    assert roofline.layer_labels(points, layers, scale=1e9) == [
        ((10, 50.0), ["1", "3"]), ((100, 80.0), ["2"]), ((3, 5.0), ["4"])]


def test_a_strided_1x1_layer_reads_only_the_pixels_it_steps_on():
    """ResNet-50's layer2.0.downsample.0: 1x1, stride 2, 256 -> 512 at 56x56 reads 28x28 of its pixels."""
    problem = ConvProblem(C=256, H=56, W=56, K=512, R=1, S=1, stride=(2, 2), padding=(0, 0))
    assert conv_bytes(problem, batch=256, element_size=2) == 2 * (256 * 256 * 28 * 28 + 512 * 256 + 256 * 512 * 28 * 28)
    # A 3x3 stride-2 layer with padding 1 reads every row and column; a 2x2 stride-3 one two of every three.
    assert roofline.lines_read(56, 28, 3, 2, 1) == 56
    assert roofline.lines_read(9, 3, 2, 3, 0) == 6
    assert roofline.lines_read(7, 4, 1, 2, 0) == 4


def test_the_float32_matmul_ceiling_follows_the_convolutions_tf32_setting(monkeypatch):
    """cuDNN, Triton and CUTLASS run float32 convolutions as TF32 while cudnn.allow_tf32 is set;
    torch.matmul's own setting is off by default: the ceiling takes the convolutions' and keeps it apart."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert roofline.tf32_convolutions("cuda", torch.float32)
    assert not roofline.tf32_convolutions("cuda", torch.bfloat16) and not roofline.tf32_convolutions("cpu", torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not roofline.tf32_convolutions("cuda", torch.float32)
    assert roofline.measure_ceilings("cpu", torch.float32)["tf32"] is False
    # The switch itself (flags only: no GPU needed), on while the matmul is timed, restored after.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    matmul = torch.backends.cuda.matmul  # not monkeypatch: its settings are properties of a C++ module
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        with roofline.matmul_in_convolution_precision("cuda", torch.float32):
            assert matmul.allow_tf32
        assert not matmul.allow_tf32
        with roofline.matmul_in_convolution_precision("cpu", torch.float32):
            assert not matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before
    # The cache keeps float32 timed as TF32 apart from IEEE float32.
    monkeypatch.setattr(roofline, "device_name", lambda device: "GPU")
    assert roofline.ceiling_key("cuda", torch.float32) == "GPU / fp32 as tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert roofline.ceiling_key("cuda", torch.float32) == "GPU / fp32"


def test_the_matmul_precision_switch_where_the_legacy_flag_raises(monkeypatch, precision_settings):
    """Settings made through PyTorch's per-op API alone (matmul as TF32) leave the legacy flag
    raising: the switch then sets and restores fp32_precision itself."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the convolutions: IEEE
    with roofline.matmul_in_convolution_precision("cuda", torch.float32):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not tf32_allowed("matmul")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and tf32_allowed("matmul")


def test_the_note_on_points_above_the_roof_names_the_ceiling_they_outran():
    ceiling = {"matmul_flop_per_s": 1e12, "copy_bytes_per_s": 1e11}
    memory_bound = roofline.roofline_point("a", "torch", 1e6, 1e6, 0.005, ceiling)  # twice the copy rate
    compute_bound = roofline.roofline_point("b", "torch", 1e9, 1e3, 0.5, ceiling)  # twice the matmul rate
    under = roofline.roofline_point("c", "torch", 1e9, 1e3, 2.0, ceiling)
    assert (memory_bound["bound"], memory_bound["percent_of_bound"]) == ("memory", 200)
    assert roofline.above_roof_note([memory_bound, under]) == "Points above the roof outran the measured copy bandwidth."
    assert roofline.above_roof_note([compute_bound]) == (
        "Points above the roof outran the measured matmul ceiling.")
    assert "matmul ceiling or copy bandwidth" in roofline.above_roof_note([compute_bound, memory_bound])
    assert roofline.above_roof_note([under]) is None


def test_the_matmul_ceiling_is_the_fastest_of_each_op_and_dtype(monkeypatch):
    """The product is timed as torch.matmul and as a 1x1 conv2d: on a CPU PyTorch's convolutions
    (oneDNN) outran its matmul (MKL) 4x, and a roof from torch.matmul alone lay under every conv.
    In a CPU half dtype float32 is timed too: PyTorch's float16 CPU matmul can be a slow path."""
    monkeypatch.setitem(roofline.MATMUL_SIZE, "cpu", 64)
    monkeypatch.setitem(roofline.COPY_BYTES, "cpu", 64)
    # Each op's product stands for itself: time_ms looks its time up by (op, dtype).
    monkeypatch.setattr(roofline, "MATMUL_OPS", {op: functools.partial(lambda op, a, b: (op, a.dtype), op)
                                                 for op in roofline.MATMUL_OPS})
    product_ms = {("torch.matmul", torch.float16): 100.0, ("torch.matmul", torch.float32): 4.0,
                  ("1x1 conv2d", torch.float16): 50.0, ("1x1 conv2d", torch.float32): 1.0}
    monkeypatch.setattr(roofline, "time_ms", lambda fn, device, **kwargs: product_ms.get(fn, 1.0))

    def fastest(dtype):
        ceiling = roofline.measure_ceilings("cpu", dtype)
        assert ceiling["dtype"] == roofline.dtype_name(dtype)
        assert ceiling["copy_bytes_per_s"] == pytest.approx(2 * 64 / 1e-3)  # 64 bytes read and 64 written in 1 ms
        return ceiling["matmul_op"], ceiling["matmul_dtype"], ceiling["matmul_flop_per_s"]

    assert fastest(torch.float16) == ("1x1 conv2d", "fp32", pytest.approx(2 * 64**3 / 1e-3))
    assert fastest(torch.float32) == ("1x1 conv2d", "fp32", pytest.approx(2 * 64**3 / 1e-3))
    product_ms["torch.matmul", torch.float16] = 0.5
    assert fastest(torch.float16) == ("torch.matmul", "fp16", pytest.approx(2 * 64**3 / 0.5e-3))
    product_ms["torch.matmul", torch.float32] = 0.25
    assert fastest(torch.float32) == ("torch.matmul", "fp32", pytest.approx(2 * 64**3 / 0.25e-3))


@pytest.mark.parametrize("n", [64, 96])
def test_the_ceilings_1x1_conv_is_the_matmul_over_channels_last_pixels(n):
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    out = roofline.matmul_as_conv2d(a, b)()
    assert out.shape == (1, n, 32, n // 32)
    # Pixel p of the map is row p of a: the output's pixels in memory order are the product's rows.
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(n, n), a @ b)


def test_a_point_above_its_roof_has_the_ceilings_measured_again_keeping_the_higher(tmp_path, monkeypatch):
    """A ceiling cached while the machine was busy is raised the next time a layer beats it."""
    from cnnfast import bench

    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path))
    low = dict(COMPUTE_BOUND, device="CPU", dtype="fp32", tf32=False, matmul_op="torch.matmul", matmul_dtype="fp32",
               method=roofline.CEILING_METHOD, measured_at="2026-01-01T00:00:00+00:00")
    key = roofline.ceiling_key("cpu", torch.float32)
    (tmp_path / "ceilings.json").write_text(json.dumps({key: low}))
    fresh = dict(low, matmul_flop_per_s=4 * low["matmul_flop_per_s"], copy_bytes_per_s=low["copy_bytes_per_s"] / 2)
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, dtype: dict(fresh))
    # 1 GFLOP in 0.5 ms: 2 TFLOP/s, above the cached 1 TFLOP/s roof.
    result = {"device_type": "cpu", "dtype": "fp32",
              "layers": [{"layer": "conv1", "flops": 10**9, "bytes": 10**3, "results": {"torch": {"ms": 0.5}}}]}
    points, ceiling = bench.roofline_points_under_ceilings(result)
    assert ceiling["matmul_flop_per_s"] == fresh["matmul_flop_per_s"]  # the higher figure of each
    assert ceiling["copy_bytes_per_s"] == low["copy_bytes_per_s"]
    assert points[0]["percent_of_bound"] == pytest.approx(50)
    assert json.loads((tmp_path / "ceilings.json").read_text())[key] == ceiling
    result["layers"][0]["results"]["torch"]["ms"] = 4.0  # under its roof: nothing is measured again
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device, dtype: pytest.fail("measured again"))
    assert bench.roofline_points_under_ceilings(result)[1] == ceiling
