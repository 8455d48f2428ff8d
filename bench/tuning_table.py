"""Rebuilds cnnfast/tuning.json, the table behind backend=None, from bench/results/.

    python -m bench.tuning_table
    python -m bench.tuning_table --local OUTDIR    (on the GPU machine, by device_check.sh)

Per op. For each GPU, op and dtype with a benchmark against the op's baseline (PyTorch's own op;
for the convolution, cuDNN's bare convolution, which does less work than the fused op), the
backend chosen is the one faster than the baseline in every measured case (the fastest such, by
median speedup); when none is, the op stays on torch and is left out of the table.

Per conv layer ("conv2d_layers"). For each GPU, dtype, layer geometry, epilogue and batch that
bench/bench_conv2d.py or `cnnfast tune --json` (a run's tune*.json) timed, the fastest of torch,
triton, cuda, torch_triton and cudnn_fused by cnnfast.tuning's layer rule (a kernel must beat torch
by 3 %).

Each backend's cases (per op, or per layer and batch) come from the newest run that measured them,
runs ordered by their date and number (h200-DATE-runN), so a kernel rewritten and measured again
replaces its old figures. A layer's backend that a newer run left out where it timed torch on
that layer and batch (the backend failed its correctness or NaN check there, or was not run) loses
its older figures: it is not chosen on them.
"""
import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from cnnfast import json_file
from cnnfast.backends import backends_of
from cnnfast.bench import conv_precision_key, layer_times, table_layer_key
from cnnfast.roofline import DTYPES
from cnnfast.tuning import CONV_LAYERS, TABLE_PATH, dtype_key, fastest_layer_backend, save_local_choices

ROOT = Path(__file__).resolve().parent.parent
# The benchmark functions that time an op's backends against its baseline: (op, speedup field).
OP_OF_BENCHMARK = {
    "test_add_relu_gpu": ("add_relu", "speedup_vs_torch"),
    "test_global_avg_pool_gpu": ("global_avg_pool", "speedup_vs_torch"),
    "test_gap_linear_gpu": ("gap_linear", "speedup_vs_torch"),
    "test_conv2d_layer": ("conv2d", "speedup_vs_cudnn"),
}
# The conv benchmark's cases that are choices for a layer: cnnfast.ops backends.
LAYER_BACKENDS = backends_of("conv2d")


def run_order(path: Path):
    """Sort key of a run folder (<gpu>-<date>-run<N>[-note]): by date, then N as a number."""
    match = re.search(r"(\d{4}-\d{2}-\d{2})-run(\d+)", path.name)
    return (match.group(1), int(match.group(2)), path.name) if match else ("", 0, path.name)


RESULTS = ROOT / "bench" / "results"


def runs_in(results: Path) -> list[Path]:
    """The run folders under results."""
    return [path for path in Path(results).iterdir() if path.is_dir()]


def run_files(runs, *patterns: str):
    """The files of the run folders matching patterns, oldest run first."""
    paths = [path for run in runs for pattern in patterns for path in Path(run).glob(pattern)]
    return sorted(paths, key=lambda path: (run_order(path.parent), path.name))


def by_run(paths) -> list[list[Path]]:
    """run_files' paths grouped by run folder, oldest run first."""
    groups = defaultdict(list)
    for path in paths:
        groups[path.parent].append(path)
    return list(groups.values())


def measured_speedups(runs) -> dict:
    """{(gpu, op, dtype, backend): [speedup over the baseline per case]}, from the newest run of each."""
    speedups = {}
    for path in run_files(runs, "benchmarks*.json"):
        run = defaultdict(list)
        for bench in json.loads(path.read_text())["benchmarks"]:
            op, field = OP_OF_BENCHMARK.get(bench["name"].split("[")[0], (None, None))
            info = bench["extra_info"]
            # Only an op's own backends are choices: not PyTorch (the baseline), nor the benchmarks'
            # other variants (eager, cudnn's bare conv, cuda_fprop's forced schedule).
            if op and field in info and info["backend"] in backends_of(op) and info["backend"] != "torch":
                # A conv's float32 entry is filed by the precision it ran in, as default_backend looks it up.
                dtype = conv_precision_key(info) if op == "conv2d" else dtype_key(DTYPES[info["dtype"]])
                key = (info["device"], op, dtype, info["backend"])
                run[key].append(info[field])
        speedups.update(run)  # a newer run replaces what an older one measured of the same key
    return speedups


def measured_layer_times(runs) -> dict:
    """{(gpu, dtype, layer key, batch): {backend: ms}} of the conv layer benchmarks and of the
    `cnnfast tune --json` measurements (tune*.json) of the runs, each backend's time from the
    newest run that timed it on that layer and batch."""
    times = defaultdict(dict)
    for paths in by_run(run_files(runs, "benchmarks*.json", "tune*.json")):
        run = defaultdict(dict)
        for path in paths:
            data = json.loads(path.read_text())
            if path.name.startswith("tune"):
                dtype = conv_precision_key(data)
                for layer in data["layers"]:
                    key, layer_ms = layer_times(layer)
                    run[(data["device"], dtype, key, data["batch"])].update(layer_ms)
                continue
            for bench in data["benchmarks"]:
                info = bench["extra_info"]
                backend = info.get("backend")
                if (bench["name"].split("[")[0] != "test_conv2d_layer" or backend not in LAYER_BACKENDS
                        or "problem" not in info):
                    continue
                dtype = conv_precision_key(info)
                run[(info["device"], dtype, table_layer_key(info["problem"]), info["batch"])][backend] = info["ms"]
        for key, layer_ms in run.items():
            if "torch" in layer_ms:  # what this run timed beside torch is all it still chooses from
                times[key] = {}
            times[key].update(layer_ms)
    return dict(times)


def build_table(results=RESULTS, runs=None) -> dict:
    """The table the runs give (default: every run under results)."""
    runs = runs_in(results) if runs is None else runs
    best = {}
    for (gpu, op, dtype, backend), values in measured_speedups(runs).items():
        if min(values) > 1 and statistics.median(values) > best.get((gpu, op, dtype), ("torch", 1.0))[1]:
            best[(gpu, op, dtype)] = (backend, statistics.median(values))
    table = defaultdict(lambda: defaultdict(dict))
    for (gpu, op, dtype), (backend, _) in sorted(best.items()):
        table[gpu][op][dtype] = backend
    for (gpu, dtype, key, batch), times_ms in sorted(measured_layer_times(runs).items()):
        chosen = fastest_layer_backend(times_ms)
        if chosen is not None:
            table[gpu][CONV_LAYERS].setdefault(dtype, {}).setdefault(key, {})[str(batch)] = chosen
    return json.loads(json.dumps(table))


def write_table() -> dict:
    """Rebuilds cnnfast/tuning.json from the committed results and returns the table."""
    table = build_table()
    json_file.write_object(TABLE_PATH, table)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", metavar="RUN", type=Path,
                        help="instead: merge what one device_check.sh output folder measured into this machine's "
                        "local table (cnnfast.tuning.local_table_path()), which backend=None reads at once")
    args = parser.parse_args(argv)
    if args.local is None:
        print(json.dumps(write_table(), indent=1, sort_keys=True))
    else:
        print(save_local_choices(build_table(runs=[args.local])))


if __name__ == "__main__":
    main()
