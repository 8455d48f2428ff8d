"""Rebuilds cnnfast/tuning.json, the table behind backend=None, from bench/results/.

    python bench/tuning_table.py

For each GPU, op and dtype with a benchmark against the op's baseline (PyTorch's own op; for the
convolution, cuDNN's bare convolution, which does less work than the fused op), the backend chosen
is the one faster than the baseline in every measured case (the fastest such, by median speedup);
when none is, the op stays on torch and is left out of the table. Each backend's cases come from
the newest run that measured it (runs sort by their folder name, h200-DATE-runN), so a kernel
rewritten and measured again replaces its old figures.
"""
import json
import statistics
from collections import defaultdict
from pathlib import Path

from cnnfast.roofline import DTYPES

ROOT = Path(__file__).resolve().parent.parent
# The benchmark functions that time an op's backends against its baseline: (op, speedup field).
OP_OF_BENCHMARK = {
    "test_add_relu_gpu": ("add_relu", "speedup_vs_torch"),
    "test_global_avg_pool_gpu": ("global_avg_pool", "speedup_vs_torch"),
    "test_gap_linear_gpu": ("gap_linear", "speedup_vs_torch"),
    "test_conv2d_layer": ("conv2d", "speedup_vs_cudnn"),
}
# The benchmarks' own backends that are not cnnfast.ops backends (PyTorch paths).
BASELINES = {"torch", "cudnn", "eager", "eager_folded"}


def measured_speedups(results=ROOT / "bench" / "results") -> dict:
    """{(gpu, op, dtype, backend): [speedup over the baseline per case]}, from the newest run of each."""
    speedups = {}
    for path in sorted(Path(results).glob("*/benchmarks*.json")):
        run = defaultdict(list)
        for bench in json.loads(path.read_text())["benchmarks"]:
            op, field = OP_OF_BENCHMARK.get(bench["name"].split("[")[0], (None, None))
            info = bench["extra_info"]
            if op and field in info and info["backend"] not in BASELINES:
                key = (info["device"], op, str(DTYPES[info["dtype"]]).removeprefix("torch."), info["backend"])
                run[key].append(info[field])
        speedups.update(run)  # a newer run replaces what an older one measured of the same key
    return speedups


def build_table(results=ROOT / "bench" / "results") -> dict:
    best = {}
    for (gpu, op, dtype, backend), values in measured_speedups(results).items():
        if min(values) > 1 and statistics.median(values) > best.get((gpu, op, dtype), ("torch", 1.0))[1]:
            best[(gpu, op, dtype)] = (backend, statistics.median(values))
    table = defaultdict(lambda: defaultdict(dict))
    for (gpu, op, dtype), (backend, _) in sorted(best.items()):
        table[gpu][op][dtype] = backend
    return json.loads(json.dumps(table))


def write_table() -> dict:
    """Rebuilds cnnfast/tuning.json from the committed results and returns the table."""
    table = build_table()
    (ROOT / "cnnfast" / "tuning.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


if __name__ == "__main__":
    print(json.dumps(write_table(), indent=1, sort_keys=True))
