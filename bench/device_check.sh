#!/usr/bin/env bash
# The GPU checks (DESIGN.md "GPU checks"): build offline, GPU tests, sanitizer runs, benchmarks,
# report. Everything lands in OUTDIR (default bench/out). Each step runs under its own time limit
# and a failing step is recorded and the rest still run; the summary table is printed last. All
# steps together can take about 10 minutes; CNNFAST_STEPS picks some of them (comma-separated
# step names, or their first word, as "sanitizer"; environment, wheels and build always run), so
# the checks can be split over two calls of one device lease.
#   bash bench/device_check.sh [OUTDIR]        (CNNFAST_COMMIT=<sha> names the commit measured)
#   CNNFAST_STEPS=gpu-tests,benchmarks bash bench/device_check.sh OUTDIR
set -u
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-bench/out}" && cd "${1:-bench/out}" && pwd)
LOG="$OUT/device_check.log"
STEPS="$OUT/steps.tsv"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # bench/ scripts import the references from tests/
: >"$LOG"
printf 'step\tstatus\tseconds\n' >"$STEPS"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output appended to the log.
step() {
  local name=$1 limit=$2 start rc status
  shift 2
  case ",${CNNFAST_STEPS:-all},environment,wheels,build," in *",all,"* | *",${name%%-*},"* | *",$name,"*) ;; *) return ;; esac
  echo "=== $name ($(date -u +%H:%M:%S)): $*" | tee -a "$LOG"
  start=$(date +%s)
  # SIGINT first: pytest then still writes its JSON and XML for the cases that ran.
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status="timeout (${limit}s)" ;; *) status="FAILED (exit $rc)" ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$STEPS"
  echo "--- $name: $status" | tee -a "$LOG"
}

step environment 60 "$PYTHON" bench/environment.py "$OUT/env.json"

# The GPU machine has no network: build requirements it lacks (nvidia-cutlass's headers) travel
# as wheels in the git-ignored .whl/ folder (named in the device call's carry list).
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 120 "$PYTHON" -m pip install --no-index --no-deps .whl/*.whl
fi
step build 600 env CNNFAST_BUILD_CUDA=1 "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .

step gpu-tests 170 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

step benchmarks 170 "$PYTHON" -m pytest bench --benchmark-only -q -p no:cacheprovider \
  --ignore=bench/bench_models.py --benchmark-json="$OUT/benchmarks.json"

step model-benchmarks 150 "$PYTHON" -m pytest bench/bench_models.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/benchmarks_models.json"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck initcheck; do
  step "sanitizer-$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 1 "$PYTHON" bench/sanitizer_cases.py
done

step report 45 bash -c "\"$PYTHON\" -m cnnfast.cli report --out \"$OUT/report\" && tar -czf \"$OUT/report.tar.gz\" -C \"$OUT\" report && rm -r \"$OUT/report\""

"$PYTHON" bench/summarize_device_check.py "$OUT" | tee -a "$LOG"
