#!/usr/bin/env bash
# The GPU checks: build offline, GPU tests, sanitizer runs, benchmarks,
# report. Each step runs under its own time limit and a failing step is recorded and the rest
# still run; the summary table is printed last. All steps' limits add up to about half an hour,
# more than one 10-minute call of a lent GPU: CNNFAST_STEPS picks some of them (comma-separated
# step names, or the part of a name before a dash, as "sanitizer" or "gpu-tests"; environment,
# wheels and build always run), so that the checks can be split over calls.
#
# The record (log, step table, environment, test and benchmark files) is kept in RUN_DIR
# (CNNFAST_RUN_DIR, default bench/out/run, which a warm machine keeps between calls) and packed
# into OUTDIR/results.tar.gz after every step, with OUTDIR/summary.md at the end: the device tool
# brings back at most 8 files, so the record travels as one archive, complete up to the last
# finished step whatever stops the call. CNNFAST_CONTINUE=1 adds to an earlier call's record on
# the same machine instead of starting a new one. `python -m bench.collect_results OUTDIR` files it.
#   bash bench/device_check.sh [OUTDIR]        (CNNFAST_COMMIT=<sha> names the commit measured)
#   CNNFAST_STEPS=gpu-tests,benchmarks bash bench/device_check.sh OUTDIR
# CNNFAST_DEADLINE=S: the whole call ends within S seconds of its start. Each step's limit is cut
# to the time left, less 30 s kept for the summary and the archive, and a step with under 20 s
# left is recorded as skipped, so a call's record comes back whole within its caller's limit.
# A 15-minute lease (two calls, plus the machine's start; both carry .whl and .prebuilt, and the
# second, made at once, finds the machine warm: build, tuning table, kernel choices):
#   CNNFAST_COMMIT=<sha> CNNFAST_DEADLINE=560 CNNFAST_STEPS=gpu-tests-tma,benchmarks-conv,benchmarks-table bash bench/device_check.sh "$OUT"
#   CNNFAST_COMMIT=<sha> CNNFAST_CONTINUE=1 CNNFAST_DEADLINE=<device time left - 40> \
#     CNNFAST_STEPS=benchmarks-table,model-benchmarks,report bash bench/device_check.sh "$OUT"
# (<sha> written out: the machine's copy of the tree has no .git; commit first, since env.json records
# the tree's source files and collect_results refuses a record whose tree differs from <sha>.
# benchmarks-table runs again in the second call in case the first was cut short before it.)
# On a fresh machine instead, unpack the first archive into a git-ignored folder, carry it, and set
# CNNFAST_TUNING_FILE and CNNFAST_KERNEL_CACHE to its tuning_local.json and triton_conv2d_choices.json.
# model-benchmarks reaches ResNet-50's cases first; torch.compile's case, last, needs minutes of its own.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
OUT=$(mkdir -p "${1:-bench/out}" && cd "${1:-bench/out}" && pwd)
RUN=${CNNFAST_RUN_DIR:-$PWD/bench/out/run}
[ "${CNNFAST_CONTINUE:-0}" = 1 ] || rm -rf "$RUN"
mkdir -p "$RUN"
LOG="$RUN/device_check.log"
STEPS="$RUN/steps.tsv"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # bench/ scripts import the references from tests/
# The caches below live in $HOME/.cache; a runner that starts commands without HOME gets the
# user's home directory, not an unbound-variable stop.
export HOME=${HOME:-$(cd ~ 2>/dev/null && pwd || echo /tmp)}
# Triton's autotuning results go to its disk cache, so the kernel benchmarks, the model benchmarks
# and the report (separate processes, often the same layer shapes) tune each shape once.
export TRITON_CACHE_AUTOTUNING=1
# backend=None's local table: the benchmarks-table step fills it from this call's conv benchmarks,
# so the model benchmarks' default variant runs each layer on the backend just measured fastest
# (in $HOME/.cache, which a warm machine keeps between calls, as it keeps the build). The GPU tests
# run without it (TESTS_ENV): they check the committed table, whatever an earlier call measured.
export CNNFAST_TUNING_FILE=${CNNFAST_TUNING_FILE:-$HOME/.cache/cnnfast/tuning.json}
# The Triton conv's measured choices of kernel and tile per layer (choice_cache.py): the kernel and
# model benchmarks, the tune step and the report measure each layer's choice once between them, and
# the file comes back with the results. The GPU tests measure their own (TESTS_ENV).
export CNNFAST_KERNEL_CACHE=${CNNFAST_KERNEL_CACHE:-$HOME/.cache/cnnfast/triton_conv2d.json}
# Their tuning, timed by several test workers sharing the GPU, is not kept for the benchmarks either.
TESTS_ENV=(env CNNFAST_TUNING_FILE=/dev/null CNNFAST_KERNEL_CACHE=/dev/null TRITON_CACHE_AUTOTUNING=0)
touch "$LOG"
[ -f "$STEPS" ] || printf 'step\tstatus\tseconds\n' >"$STEPS"

# pack: the record so far, with the Triton conv's measured choices, as OUTDIR/results.tar.gz
# (written beside and renamed, so that a call stopped while packing leaves the last whole archive).
pack() {
  if [ -f "$CNNFAST_KERNEL_CACHE" ]; then cp "$CNNFAST_KERNEL_CACHE" "$RUN/triton_conv2d_choices.json"; fi
  local status=0
  tar -czf "$OUT/results.tar.gz.part" -C "$RUN" . || status=$?
  # GNU tar's 1: a file changed while it was read (a log still being written); the archive is whole.
  if [ "$status" -le 1 ]; then mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"; fi
}

# Whether CNNFAST_STEPS selects step NAME: all, NAME itself, or a prefix of NAME ending at a dash.
selected() {
  local token tokens
  IFS=, read -ra tokens <<<"${CNNFAST_STEPS:-all}"
  for token in "${tokens[@]}" environment wheels build; do
    [[ $token == all || $1 == "$token" || $1 == "$token"-* ]] && return 0
  done
  return 1
}

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output appended to the log.
step() {
  local name=$1 limit=$2 start rc status
  shift 2
  selected "$name" || return 0
  if [ -n "${CNNFAST_DEADLINE:-}" ]; then
    local left=$((CNNFAST_DEADLINE - ($(date +%s) - START) - 30))
    if [ "$left" -lt 20 ]; then
      echo "--- $name: skipped, ${left}s left before CNNFAST_DEADLINE" | tee -a "$LOG"
      printf '%s\t%s\t0\n' "$name" "skipped (deadline)" >>"$STEPS"
      return 1  # not run: a build skipped this way must not leave its stamp
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  # SIGINT first: pytest then still writes its JSON and XML for the cases that ran (a parallel
  # Triton compile it interrupts finishes its queue first, hence the grace before the kill).
  timeout -s INT -k 25 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124) status="timeout (${limit}s)" ;;
    137) status="killed (${limit}s limit and its grace, or memory)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$STEPS"
  echo "--- $name: $status" | tee -a "$LOG"
  pack
  return $rc
}

# A continued record keeps its first call's environment (its start time and commit name the run);
# the later call's goes beside it.
ENV_FILE="$RUN/env.json"
[ -f "$ENV_FILE" ] && ENV_FILE="$RUN/env_continued.json"
step environment 60 "$PYTHON" bench/environment.py "$ENV_FILE"

# The GPU machine has no network: build requirements it lacks (nvidia-cutlass's headers) travel
# as wheels in the git-ignored .whl/ folder (named in the device call's carry list).
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 120 "$PYTHON" -m pip install --no-index --no-deps .whl/*.whl
fi
# A warm machine keeps the built cnnfast/_C*.so between calls (ignored files stay), and a build
# costs minutes of a 15-minute lease: rebuild only when the extension's sources changed.
# The hash covers what the build depends on: the sources, the CUTLASS headers' version (a build
# without them has no convolution), nvcc and the target architectures.
BUILD_STAMP=cnnfast/.build-sources.sha256
sources_hash() {
  {
    cat setup.py CMakeLists.txt pyproject.toml kernels/cuda/*
    "$PYTHON" -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))" 2>&1
    nvcc --version 2>&1
    echo "${CMAKE_CUDA_ARCHITECTURES:-}"
  } | sha256sum | cut -d' ' -f1
}
# build_extension STEP LIMIT [VAR=VALUE...]: pip's build of cnnfast._C with those variables set,
# then an import of it (a module that links but misses a symbol fails there, not in the tests).
build_extension() {
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" env CNNFAST_BUILD_CUDA=1 "$@" bash -c \
    '"$0" -m pip install -v --no-build-isolation --no-deps -e . && "$0" -c "import cnnfast._C"' "$PYTHON"
}
# Kernels compiled before the lease (`python -m bench.kernels_archive pack`, into the git-ignored
# .prebuilt/ named in the device call's carry list) stand in for compiling kernels/cuda/*.cu when
# they were built from these sources with this nvcc release: the build then compiles bindings.cpp
# alone, seconds instead of minutes. If that build or its import fails, the full build runs.
PREBUILT=.prebuilt
prebuilt_fits() {
  [ -f "$PREBUILT/libcnnfast_kernels.a" ] || return 1
  local verdict rc
  verdict=$("$PYTHON" -m bench.kernels_archive check "$PREBUILT" 2>&1)
  rc=$?
  echo "$verdict" | tee -a "$LOG"
  return $rc
}
if compgen -G "cnnfast/_C*.so" >/dev/null && [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$(sources_hash)" ]; then
  echo "=== build: cnnfast/_C matches its sources ($BUILD_STAMP), not rebuilt" | tee -a "$LOG"
  printf 'build\tcached\t0\n' >>"$STEPS"
else
  rm -f "$BUILD_STAMP"  # a failed or interrupted build must not leave a stamp behind
  if { prebuilt_fits && build_extension build-prebuilt 120 CNNFAST_PREBUILT_KERNELS="$PWD/$PREBUILT/libcnnfast_kernels.a"; } ||
    build_extension build 600; then
    sources_hash >"$BUILD_STAMP"
  fi
fi

# Two steps, so that the files with GPU cases that have never run get their own time limit; each
# step that hits its limit still keeps the cases that ran. Four pytest-xdist workers share the
# GPU: most of these tests' time is Triton compiling on the host's CPU cores (four, not more:
# each worker's caching allocator keeps what its 2^31-element cases took, up to about 13 GB).
NEW_GPU_TESTS=(tests/test_conv2d_gpu.py tests/test_torch_triton.py tests/test_cudnn_fused.py
  tests/test_reliability_gpu.py tests/test_gap_linear.py tests/test_optimize.py tests/test_global_avg_pool.py)
# The Triton TMA conv kernels' cases (conv2d_pointwise.py, conv2d_spatial.py), which have never run
# on a GPU, first and in a step of their own (98 spatial and 82 pointwise per-layer cases, each
# compiling its config: 180 s).
TMA_GPU_TESTS="triton_pointwise or triton_spatial or triton_tma or (past_2_31 and tma)"
# A step's result file from an earlier run into the same folder would be summed with this run's.
selected gpu-tests-tma && rm -f "$RUN/gpu_tests_tma.xml"
selected gpu-tests-new && rm -f "$RUN/gpu_tests_new.xml"
selected gpu-tests-new-cuda && rm -f "$RUN/gpu_tests_new_cuda.xml"
selected gpu-tests-rest && rm -f "$RUN/gpu_tests_rest.xml"
selected gpu-tests-cudnn && rm -f "$RUN/gpu_tests_cudnn.xml"
# The CUDA extension's cases (ids with "cuda") in a step of their own: a fault in a kernel that has
# never run on a GPU leaves its worker's CUDA context failing every case after it.
step gpu-tests-tma 180 "${TESTS_ENV[@]}" "$PYTHON" -m pytest "${NEW_GPU_TESTS[@]}" -m gpu -k "$TMA_GPU_TESTS" -q -n 4 -p no:cacheprovider \
  --junitxml="$RUN/gpu_tests_tma.xml"
step gpu-tests-new 150 "${TESTS_ENV[@]}" "$PYTHON" -m pytest "${NEW_GPU_TESTS[@]}" -m gpu \
  -k "not cuda and not cudnn_fused and not ($TMA_GPU_TESTS)" -q -n 4 -p no:cacheprovider --junitxml="$RUN/gpu_tests_new.xml"
step gpu-tests-new-cuda 100 "${TESTS_ENV[@]}" "$PYTHON" -m pytest "${NEW_GPU_TESTS[@]}" -m gpu -k cuda -q -n 4 -p no:cacheprovider \
  --junitxml="$RUN/gpu_tests_new_cuda.xml"
step gpu-tests-rest 120 "${TESTS_ENV[@]}" "$PYTHON" -m pytest tests -m gpu -q -n 4 -p no:cacheprovider "${NEW_GPU_TESTS[@]/#/--ignore=}" \
  --junitxml="$RUN/gpu_tests_rest.xml"
# cuDNN's fused convolution (ids with "cudnn_fused"): its runtime-fusion engines may compile a
# kernel per new layer shape, so its cases get a time limit of their own, after the others.
step gpu-tests-cudnn 90 "${TESTS_ENV[@]}" "$PYTHON" -m pytest "${NEW_GPU_TESTS[@]}" -m gpu -k cudnn_fused -q -n 4 -p no:cacheprovider \
  --junitxml="$RUN/gpu_tests_cudnn.xml"

# The conv layers (ResNet-50's first, then VGG-16's; each new layer tunes its Triton kernels, 10-20 s)
# and the memory-bound ops in steps of their own. The CUDA extension's cases run in a process of
# their own: a kernel fault there (the CUTLASS conv and the CUDA head have not run on a GPU before)
# would leave a CUDA context that fails every case after it.
step benchmarks-conv 240 "$PYTHON" -m pytest bench/bench_conv2d.py --benchmark-only -q -p no:cacheprovider \
  -k "not cuda" --benchmark-json="$RUN/benchmarks_conv.json"
step benchmarks-memory 90 "$PYTHON" -m pytest bench --benchmark-only -q -p no:cacheprovider -k "not cuda" \
  --ignore=bench/bench_models.py --ignore=bench/bench_conv2d.py --benchmark-json="$RUN/benchmarks_memory.json"
step benchmarks-cuda 100 "$PYTHON" -m pytest bench --benchmark-only -q -p no:cacheprovider -k cuda \
  --ignore=bench/bench_models.py --benchmark-json="$RUN/benchmarks_cuda.json"
step benchmarks-table 60 bash -c "\"$PYTHON\" -m bench.tuning_table --local \"$RUN\" && cp \"\$CNNFAST_TUNING_FILE\" \"$RUN/tuning_local.json\""

step model-benchmarks 150 "$PYTHON" -m pytest bench/bench_models.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$RUN/benchmarks_models.json"

# ResNet-50's layers at batch 1 on torch, triton and cuda, for the tuning table's batch-1 choices
# (after the model benchmarks, whose batch-1 runs leave the Triton autotuning results on disk).
step tune 90 "$PYTHON" -m cnnfast.cli tune resnet50 --batch 1 --dry-run --json "$RUN/tune_resnet50_b1.json"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck initcheck; do
  step "sanitizer-$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 1 "$PYTHON" bench/sanitizer_cases.py
done

# The report times a few ResNet-50 layers on every backend for its roofline (each tuning its
# kernels): 2 minutes. Whatever it wrote is archived as one file, finished or not.
step report 120 "$PYTHON" -m cnnfast.cli report --out "$RUN/report"
if [ -d "$RUN/report" ]; then
  tar -czf "$RUN/report.tar.gz" -C "$RUN" report && rm -r "$RUN/report"
fi

"$PYTHON" bench/summarize_device_check.py "$RUN" | tee -a "$LOG"
cp "$RUN/summary.md" "$OUT/summary.md" 2>/dev/null
pack
# The exit status says whether every step of the record (this call's and any it continues) passed,
# each judged by its last run (a step cut short in one call and run again in the next counts once).
! awk -F'\t' 'NR > 1 { last[$1] = $2 } END { for (name in last) print last[name] }' "$STEPS" |
  grep -qE '^(FAILED|timeout|killed|skipped)' 
