"""Summarizes a device_check.sh output folder into summary.md and prints it.

    python bench/summarize_device_check.py OUTDIR
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_json(path: Path):
    """The file's JSON, None where it is absent or cut short (a step killed while writing it)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        return None


def steps_table(out: Path) -> list[str]:
    if not (out / "steps.tsv").is_file():
        return ["steps: no record"]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return ["| step | status | seconds |", "| --- | --- | ---: |"] + [f"| {n} | {s} | {t} |" for n, s, t in rows]


def tests_line(out: Path) -> str:
    """The GPU test counts summed over the steps' JUnit files (gpu_tests*.xml)."""
    paths = sorted(out.glob("gpu_tests*.xml"))
    if not paths:
        return "GPU tests: no result file"
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    unreadable = []
    for path in paths:
        try:
            suite = ET.parse(path).getroot()
        except ET.ParseError:  # cut short by a kill
            unreadable.append(path.name)
            continue
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    failed, skipped = totals["failures"] + totals["errors"], totals["skipped"]
    line = f"GPU tests: {totals['tests'] - failed - skipped} passed, {failed} failed, {skipped} skipped"
    return line + (f" (unreadable: {', '.join(unreadable)})" if unreadable else "")


def fmt(value, spec):
    return format(value, spec) if value is not None else ""


def benchmark_table(out: Path) -> list[str]:
    """One row per GPU benchmark case; blank cells where a figure does not apply."""
    runs = [run for path in sorted(out.glob("benchmarks*.json")) if (run := read_json(path)) is not None]
    if not runs:
        return ["benchmarks: no result file"]
    lines = [
        "| case | ms | TFLOP/s | GB/s | % copy BW | speedup | over |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for bench in (bench for data in runs for bench in data["benchmarks"]):
        info = bench["extra_info"]
        if "ms" not in info:  # CPU smoke cases
            continue
        fraction = info.get("fraction_of_copy_bandwidth")
        over = "cudnn" if "speedup_vs_cudnn" in info else "torch"
        lines.append(
            f"| {bench['name']} | {info['ms']:.4f} | {fmt(info.get('tflops'), '.1f')} | {fmt(info.get('gbps'), '.0f')} "
            f"| {fmt(fraction and 100 * fraction, '.0f')} | {fmt(info.get('speedup_vs_' + over), '.2f')} | {over} |"
        )
    return lines


def main(out: Path) -> str:
    env = read_json(out / "env.json") or {}
    header = (
        f"# device_check {env.get('date', '?')}\n\n"
        f"GPU {env.get('gpu')} ({env.get('nvidia_smi')}), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, commit {env.get('commit')}\n"
    )
    # The steps and the test counts last: a long output comes back cut from the front.
    text = "\n".join([header, *benchmark_table(out), "", *steps_table(out), "", tests_line(out), ""])
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
