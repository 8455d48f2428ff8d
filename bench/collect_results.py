"""Files a device_check.sh output folder under bench/results/ and regenerates what is built from it.

    python -m bench.collect_results OUTDIR [--name NAME] [--replace] [--force]

OUTDIR holds the run's record as results.tar.gz (what device_check.sh leaves there), or unpacked.
Copies the run's record (env.json, steps.tsv, summary.md, the GPU tests' JUnit files, the
benchmark and `cnnfast tune` JSON files, the local tuning table the model benchmarks ran with,
the Triton conv's measured kernel choices, the report archive, the log gzipped) into
bench/results/NAME, where NAME defaults to <gpu>-<date>-run<N> (h200-2026-12-01-run1, N after
the highest run number of that GPU's day, notes such as run2-memory-bound included) and a name
given must have that form too, since the tuning table orders runs by it. Then rebuilds
cnnfast/tuning.json (bench/tuning_table.py) and the README's results section
(bench/readme_results.py).

Refused, unless --force: a record without a GPU (device_check.sh run on a CPU machine), without
the commit measured (CNNFAST_COMMIT unset), or whose tree differs from that commit (env.json's
"sources" against `git ls-tree`: changes not yet committed were measured; forced, its commit is
filed as "<commit>+changes"). A record already filed (same GPU, start time and
commit: the archive of a second call with CNNFAST_CONTINUE=1 holds the first's too) is refused
unless --replace, which files it in place of the earlier copy.
"""
import argparse
import gzip
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bench import readme_results, tuning_table
from bench.environment import is_source

ROOT = Path(__file__).resolve().parent.parent
RESULTS = tuning_table.RESULTS
ARCHIVE = "results.tar.gz"  # device_check.sh's record, packed
KEPT = ("env.json", "env_continued.json", "steps.tsv", "summary.md", "gpu_tests*.xml", "benchmarks*.json",
        "tune*.json", "tuning_local.json", "triton_conv2d_choices.json", "report.tar.gz")
# What tuning_table.run_order sorts runs by: <gpu>-<YYYY-MM-DD>-run<N>[-note].
RUN_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*-\d{4}-\d{2}-\d{2}-run\d+(-[a-z0-9-]+)?")
# The facts that tell one device_check.sh record from another.
IDENTITY = ("gpu", "date", "commit")
CHANGED_TREE = "+changes"  # appended to the commit of a record filed with --force from a differing tree


def run_name(out: Path, results: Path = RESULTS) -> str:
    """<gpu>-<date>-run<N>: "NVIDIA H200" -> h200, the run's UTC date, N after the day's highest."""
    env = json.loads((out / "env.json").read_text())
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu", "gpu")).lower().removeprefix("nvidia ")).strip("-")
    stem = f"{gpu}-{str(env.get('date', 'undated'))[:10]}-run"
    taken = [int(match.group(1)) for p in results.glob(f"{stem}*") if (match := re.match(r"(\d+)", p.name[len(stem):]))]
    return f"{stem}{max(taken, default=0) + 1}"


def tree_differences(env: dict, root: Path = ROOT) -> list[str] | None:
    """How the measured tree's source files (env.json's "sources") differ from the commit it names
    ("changed PATH", "missing PATH", "extra PATH"); None when the record has no "sources" or the
    commit is not in this repository, so nothing can be compared."""
    if "sources" not in env:
        return None
    listing = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", str(env.get("commit")), "--"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    committed = {}
    for line in listing.stdout.splitlines():
        meta, path = line.split("\t", 1)
        if is_source(path):
            committed[path] = meta.split()[2]
    measured = env["sources"]
    return ([f"changed {path}" for path in sorted(committed) if path in measured and measured[path] != committed[path]]
            + [f"missing {path}" for path in sorted(committed.keys() - measured.keys())]
            + [f"extra {path}" for path in sorted(measured.keys() - committed.keys())])


def filed_as(env: dict, results: Path) -> Path | None:
    """The run folder under results already holding the record env describes, if any."""
    def identity(record: dict) -> list:
        return [str(record.get(field)).removesuffix(CHANGED_TREE) for field in IDENTITY]

    for path in sorted(results.glob("*/env.json")):
        if identity(json.loads(path.read_text())) == identity(env):
            return path.parent
    return None


def collect(out: Path, name: str | None = None, results: Path = RESULTS, *, replace=False, force=False) -> Path:
    """Copies the run's record into results/name (which must not exist yet) and returns that folder."""
    archive = out / ARCHIVE
    if archive.is_file() and not (out / "env.json").is_file():
        with tempfile.TemporaryDirectory() as unpacked, tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
            return collect(Path(unpacked), name, results, replace=replace, force=force)
    if not (out / "env.json").is_file():
        raise SystemExit(f"{out} has no env.json (nor {ARCHIVE} holding one): not a device_check.sh output folder")
    env = json.loads((out / "env.json").read_text())
    if not force and not env.get("gpu"):
        raise SystemExit(f"{out}: the record has no GPU (device_check.sh ran without one); --force files it anyway")
    if not force and env.get("commit", "unknown") == "unknown":
        raise SystemExit(f"{out}: the record does not say which commit it measured (CNNFAST_COMMIT was unset); "
                         "--force files it anyway")
    differences = tree_differences(env)
    if differences is None and "sources" in env:
        print(f"warning: commit {env.get('commit')} is not in this repository: the tree measured is not checked")
    if differences and not force:
        raise SystemExit(f"{out}: the tree measured differs from commit {env['commit']} ({', '.join(differences[:8])}"
                         f"{', ...' if len(differences) > 8 else ''}); commit first and measure again, or --force "
                         f"files it as {env['commit']}{CHANGED_TREE}")
    if name is not None and not RUN_NAME.fullmatch(name):
        raise SystemExit(f"--name {name!r}: expected <gpu>-<YYYY-MM-DD>-run<N>[-note], the form runs are ordered by")
    earlier = filed_as(env, results) if results.is_dir() else None
    if earlier is not None and not replace:
        raise SystemExit(f"{out}: this record is filed already, as {earlier.name}; --replace files it in its place")
    if earlier is not None:
        shutil.rmtree(earlier)
        name = name or earlier.name
    target = results / (name or run_name(out, results))
    target.mkdir(parents=True, exist_ok=False)
    for pattern in KEPT:
        for path in sorted(out.glob(pattern)):
            shutil.copy2(path, target / path.name)
    if differences:
        env["commit"] = f"{env['commit']}{CHANGED_TREE}"
        (target / "env.json").write_text(json.dumps(env, indent=1))
    log = out / "device_check.log"
    if log.is_file():
        with log.open("rb") as source, gzip.open(target / "device_check.log.gz", "wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder device_check.sh wrote")
    parser.add_argument("--name", help="the folder name under bench/results/ (default: <gpu>-<date>-run<N>)")
    parser.add_argument("--replace", action="store_true",
                        help="file a record filed before (a later archive of the same run) in place of the earlier copy")
    parser.add_argument("--force", action="store_true", help="file a record without a GPU or without its commit")
    args = parser.parse_args()
    target = collect(args.out, args.name, replace=args.replace, force=args.force)
    tuning_table.write_table()
    readme_results.main(ROOT / "README.md")
    print(f"filed {target.relative_to(ROOT)}; rebuilt cnnfast/tuning.json and the README's results section")


if __name__ == "__main__":
    main()
