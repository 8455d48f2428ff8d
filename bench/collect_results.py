"""Files a device_check.sh output folder under bench/results/ and regenerates what is built from it.

    python -m bench.collect_results OUTDIR [--name NAME]

OUTDIR holds the run's record as results.tar.gz (what device_check.sh leaves there), or unpacked.
Copies the run's record (env.json, steps.tsv, summary.md, the GPU tests' JUnit files, the
benchmark and `cnnfast tune` JSON files, the Triton conv's measured kernel choices, the report
archive, the log gzipped) into bench/results/NAME, where NAME defaults to <gpu>-<date>-run<N>
(h200-2026-12-01-run1, N counting that GPU's runs of that day), then rebuilds
cnnfast/tuning.json (bench/tuning_table.py) and the README's results section
(bench/readme_results.py).
"""
import argparse
import gzip
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from bench import readme_results, tuning_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = tuning_table.RESULTS
ARCHIVE = "results.tar.gz"  # device_check.sh's record, packed
KEPT = ("env.json", "steps.tsv", "summary.md", "gpu_tests*.xml", "benchmarks*.json", "tune*.json",
        "triton_conv2d_choices.json", "report.tar.gz")


def run_name(out: Path, results: Path = RESULTS) -> str:
    """<gpu>-<date>-run<N>: "NVIDIA H200" -> h200, the run's UTC date, the next free N."""
    env = json.loads((out / "env.json").read_text())
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu", "gpu")).lower().removeprefix("nvidia ")).strip("-")
    stem = f"{gpu}-{str(env.get('date', 'undated'))[:10]}-run"
    taken = [int(p.name[len(stem):]) for p in results.glob(f"{stem}*") if p.name[len(stem):].isdigit()]
    return f"{stem}{max(taken, default=0) + 1}"


def collect(out: Path, name: str | None = None, results: Path = RESULTS) -> Path:
    """Copies the run's record into results/name (which must not exist yet) and returns that folder."""
    archive = out / ARCHIVE
    if archive.is_file() and not (out / "env.json").is_file():
        with tempfile.TemporaryDirectory() as unpacked, tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
            return collect(Path(unpacked), name, results)
    if not (out / "env.json").is_file():
        raise SystemExit(f"{out} has no env.json (nor {ARCHIVE} holding one): not a device_check.sh output folder")
    target = results / (name or run_name(out, results))
    target.mkdir(parents=True, exist_ok=False)
    for pattern in KEPT:
        for path in sorted(out.glob(pattern)):
            shutil.copy2(path, target / path.name)
    log = out / "device_check.log"
    if log.is_file():
        with log.open("rb") as source, gzip.open(target / "device_check.log.gz", "wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder device_check.sh wrote")
    parser.add_argument("--name", help="the folder name under bench/results/ (default: <gpu>-<date>-run<N>)")
    args = parser.parse_args()
    target = collect(args.out, args.name)
    tuning_table.write_table()
    readme_results.main(ROOT / "README.md")
    print(f"filed {target.relative_to(ROOT)}; rebuilt cnnfast/tuning.json and the README's results section")


if __name__ == "__main__":
    main()
