"""Rebuilds cnnfast/tuning.json, the table behind backend=None, from bench/results/.

    python bench/tuning_table.py

For each GPU, op and dtype with a benchmark against the op's torch backend, the backend chosen
is the one faster than torch in every measured case (the fastest such, by median speedup); when
none is, the op stays on torch and is left out of the table.
"""
import json
import statistics
from collections import defaultdict
from pathlib import Path

from cnnfast.roofline import DTYPES

ROOT = Path(__file__).resolve().parent.parent
# The benchmark functions that time an op's backends against its torch backend.
OP_OF_BENCHMARK = {
    "test_add_relu_gpu": "add_relu",
    "test_global_avg_pool_gpu": "global_avg_pool",
    "test_gap_linear_gpu": "gap_linear",
}


def measured_speedups() -> dict:
    """{(gpu, op, dtype, backend): [speedup over torch per case]} over every committed result."""
    speedups = defaultdict(list)
    for path in sorted((ROOT / "bench" / "results").glob("*/benchmarks*.json")):
        for bench in json.loads(path.read_text())["benchmarks"]:
            op, info = OP_OF_BENCHMARK.get(bench["name"].split("[")[0]), bench["extra_info"]
            if op and "speedup_vs_torch" in info and info["backend"] != "torch":
                key = (info["device"], op, str(DTYPES[info["dtype"]]).removeprefix("torch."), info["backend"])
                speedups[key].append(info["speedup_vs_torch"])
    return speedups


def build_table() -> dict:
    best = {}
    for (gpu, op, dtype, backend), values in measured_speedups().items():
        if min(values) > 1 and statistics.median(values) > best.get((gpu, op, dtype), ("torch", 1.0))[1]:
            best[(gpu, op, dtype)] = (backend, statistics.median(values))
    table = defaultdict(lambda: defaultdict(dict))
    for (gpu, op, dtype), (backend, _) in sorted(best.items()):
        table[gpu][op][dtype] = backend
    return json.loads(json.dumps(table))


if __name__ == "__main__":
    table = build_table()
    (ROOT / "cnnfast" / "tuning.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(json.dumps(table, indent=1, sort_keys=True))
