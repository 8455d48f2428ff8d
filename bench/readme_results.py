"""Regenerates the README's measured-results section from the committed GPU results.

    python -m bench.readme_results [README.md]

Reads every bench/results/*/benchmarks*.json (with its env.json) and rewrites the text between
the README's `<!-- results:start -->` and `<!-- results:end -->` markers: per run, the hardware,
software and date, the steps that failed or ran out of time (a step cut short by its time limit
keeps the cases it measured: those counts are partial), the GPU tests' counts, the run's own note (env.json's
"note", and a run folder's NOTE.md: what was learnt about a run after it was filed, such as a
kernel since rewritten), then per benchmark, backend and dtype the median over cases of the
speedup against the baseline, and the range; then the end-to-end models, per architecture and batch, each
variant's images/s (or latency at batch 1) and speedup over eager PyTorch. Nothing in that
section is typed in the README by hand.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench.summarize_device_check import tests_line
from bench.tuning_table import RESULTS, run_order

START, END = "<!-- results:start -->", "<!-- results:end -->"
MODEL_BENCHMARK = "test_model"  # bench/bench_models.py
MODEL_VARIANTS = (
    "eager", "compile", "cnnfast_torch", "cnnfast", "cnnfast_triton", "cnnfast_torch_triton", "cnnfast_cudnn", "cnnfast_cuda",
    "cnnfast_graph", "cnnfast_triton_graph", "cnnfast_torch_triton_graph", "cnnfast_cuda_graph",
)


def model_table(benchmarks) -> list[str]:
    """Per (architecture, batch): each variant's images/s (latency in ms at batch 1) and speedup over eager."""
    rows = defaultdict(dict)
    for bench in benchmarks:
        info = bench["extra_info"]
        if bench["name"].split("[")[0] == MODEL_BENCHMARK and "ms" in info:
            rows[(info["arch"], info["shape"][0])][info["backend"]] = info
    if not rows:
        return []
    seen = {variant for cells in rows.values() for variant in cells}
    variants = [v for v in MODEL_VARIANTS if v in seen] + sorted(seen - set(MODEL_VARIANTS))

    def cell(info, batch):
        if info is None:
            return ""
        figure = f"{info['ms']:.3f} ms" if batch == 1 else f"{info['images_per_s']:,.0f} img/s"
        return f"{figure} ({info['speedup_vs_torch']:.2f}x)"

    lines = ["| model | batch | " + " | ".join(variants) + " |", "| --- | ---: |" + " --- |" * len(variants)]
    for (arch, batch), cells in sorted(rows.items(), key=lambda item: (item[0][0], -item[0][1])):
        lines.append(f"| {arch} | {batch} | " + " | ".join(cell(cells.get(v), batch) for v in variants) + " |")
    return ["", "End to end, bfloat16 channels_last (speedup over eager PyTorch in brackets):", "", *lines]


def run_section(folder: Path) -> list[str]:
    env = json.loads((folder / "env.json").read_text())
    benchmarks = [b for path in sorted(folder.glob("benchmarks*.json")) for b in json.loads(path.read_text())["benchmarks"]]
    lines = [
        f"**{folder.name}**: {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}, {env.get('date', '')[:10]}, commit {env.get('commit')}. "
        f"Full table: `bench/results/{folder.name}/summary.md`.",
        *run_notes(folder, env),
        "",
        "| benchmark | backend | dtype | cases | speedup, median (min - max) | over | median % copy BW | median TFLOP/s |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: |",
    ]
    # One row per dtype: a speed is quoted with the dtype it was measured in.
    groups = defaultdict(list)
    for bench in benchmarks:
        name, info = bench["name"].split("[")[0], bench["extra_info"]
        if "ms" not in info or name == MODEL_BENCHMARK:  # CPU smoke cases; the models have their own table
            continue
        groups[(name, info["backend"], info["dtype"])].append(info)
    for (name, backend, dtype), infos in sorted(groups.items()):
        over = "cudnn" if "speedup_vs_cudnn" in infos[0] else "torch"
        if backend == over:
            continue
        speedups = [i[f"speedup_vs_{over}"] for i in infos]
        bandwidth = [100 * i["fraction_of_copy_bandwidth"] for i in infos if "fraction_of_copy_bandwidth" in i]
        tflops = [i["tflops"] for i in infos if "tflops" in i]
        lines.append(
            f"| {name} | {backend} | {dtype} | {len(infos)} | {statistics.median(speedups):.2f} "
            f"({min(speedups):.2f} - {max(speedups):.2f}) | {over} "
            f"| {f'{statistics.median(bandwidth):.0f}' if bandwidth else ''} "
            f"| {f'{statistics.median(tflops):.0f}' if tflops else ''} |"
        )
    return lines + model_table(benchmarks) + [""]


def run_notes(folder: Path, env: dict) -> list[str]:
    """The run's lines beside its tables: steps that did not finish, GPU test counts, its notes."""
    lines = []
    steps = folder / "steps.tsv"
    if steps.is_file():
        rows = [line.split("\t") for line in steps.read_text().splitlines()[1:] if line.strip()]
        last = {name: status for name, status, *_ in rows}  # a step run again counts by its last run
        unfinished = [f"{name} ({status})" for name, status in last.items() if not status.startswith(("ok", "cached"))]
        if unfinished:
            lines.append(f"Steps that failed or ran out of time (a timed-out step's counts are partial): "
                         f"{', '.join(unfinished)}.")
    if any(folder.glob("gpu_tests*.xml")):
        lines.append(f"{tests_line(folder)}.")
    notes = [env["note"]] if env.get("note") else []
    if (folder / "NOTE.md").is_file():
        notes.append((folder / "NOTE.md").read_text().strip())
    lines += [f"Note: {note.rstrip('.')}." for note in notes]
    return [line for text in lines for line in ("", text)]


def results_markdown() -> str:
    lines = []
    # Every run with a benchmark file (a device_check call may have run only the model benchmarks),
    # oldest first.
    for folder in sorted((p for p in RESULTS.iterdir() if any(p.glob("benchmarks*.json"))), key=run_order):
        lines += run_section(folder)
    return "\n".join(lines)


def main(readme: Path) -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{results_markdown()}\n{END}{tail}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md")
