#!/usr/bin/env bash
# A GPU session sized to this project's lease: 15 minutes of device time with the machine's
# start, at most 10 minutes a call, at most 8 files back from $OUT (docs/gpu.md, "A GPU session").
#   bash bench/gpu_session.sh [all|1|2]     # on a CUDA machine, from the repository root
#   step 1: the GPU-relevant tests (pytest -n) beside a parallel compile warm-up of
#           profile_forward.py's kernels, then bench/profile_forward.py alone (issue 18 item 1:
#           where PixArt-Σ- and FLUX-sized forwards spend their time, eager and CUDA graphs);
#   step 2: a parallel compile warm-up of gpu_check.py's kernels, then bench/gpu_check.py
#           alone, then bench/rotate_probe.py (bf16) with the time left;
#   all (the default): both in one call; the warm-ups share phase 1 with the tests.
# SESSION_S (default: all 540, step 1 360, step 2 300) is the whole call's time: each phase's
# limit is cut so that the phases after it keep their minimum. After every phase the results
# go to $OUT, so a call stopped at its limit still returns them: summary.md (versions, phase
# times, the tests' summary, every result table), session.tgz (every log and file, the warm-up
# logs and the tuning cache too), pytest.log and the results' JSON.
# AUTOTUNE=1 adds gpu_check's --autotune (give it SESSION_S: about 5 more minutes on an H100);
# CHECK_SECTIONS=gemm,rotate (say) runs only those sections of gpu_check.py.
# Wheels in .whl/ (bench/gpu_wheels.sh puts diffusers there) are installed first.
# SMOKE=1 rehearses the steps on tiny shapes in the interpreter (no tests, one warm-up job of
# each kind, no probe); PYTHON names the interpreter (tests/test_gpu_session.py gives a stub).
set -u
STEP=${1:-all}
case "$STEP" in
  all) SESSION_S=${SESSION_S:-540} ;;
  1) SESSION_S=${SESSION_S:-360} ;;
  2) SESSION_S=${SESSION_S:-300} ;;
  *) echo "usage: bash bench/gpu_session.sh [all|1|2]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu-session-out}
export -n OUT  # only publish writes there (gpu_check.py would copy its files to $OUT too)
STAGE=${STAGE:-/tmp/clq-session}  # everything is written here first
rm -rf "$STAGE"
RESULTS="$STAGE/results" WARM="$STAGE/warm"
mkdir -p "$OUT" "$RESULTS" "$WARM"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - T0 )); }
# limit NOMINAL RESERVE: seconds for a phase: NOMINAL, cut to leave RESERVE for the later ones
limit() {
  local l=$(( SESSION_S - $(elapsed) - $2 ))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}
note() {  # note STATUS NAME: $st = STATUS; a failure (124: stopped at its limit) is listed
  st=$1
  [ "$st" -ne 0 ] && FAILED="${FAILED:-} $2 ($st)"
  return 0
}
phase() { echo "== $* (t = $(elapsed) s)" | tee -a "$STAGE/phases.txt"; }
publish() {  # the staged files to $OUT: at most 6 of the 8 that come back
  {
    echo "# GPU session, step $STEP: $(date -u '+%F %T') UTC, t = $(elapsed) s of $SESSION_S"
    echo; echo '```'; cat "$STAGE/env.txt" 2>/dev/null; echo '```'
    echo; echo '## Phases'; echo; sed 's/^/    /' "$STAGE/phases.txt"
    if [ -f "$STAGE/pytest.log" ]; then
      echo; echo '## Tests (the end of pytest.log)'; echo; echo '```'
      tail -n 60 "$STAGE/pytest.log"; echo '```'
    fi
    for f in "$RESULTS"/*.md; do
      if [ -f "$f" ]; then echo; cat "$f"; fi  # (no table yet: the glob stays unexpanded)
    done
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
  tar czf "$OUT/session.tgz.tmp" -C "$STAGE" . && mv "$OUT/session.tgz.tmp" "$OUT/session.tgz"
  for f in "$STAGE/pytest.log" "$RESULTS"/*.json "$RESULTS"/*.jsonl; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
  done
  return 0
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$STAGE/site" .whl/*.whl || exit 1
  export PYTHONPATH="$STAGE/site:$PWD"
else
  export PYTHONPATH=$PWD
fi
SMOKE_ARG=""
if [ -n "${SMOKE:-}" ]; then
  export TRITON_INTERPRET=1
  SMOKE_ARG="--smoke"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    > "$STAGE/env.txt"
fi
# diffusers is needed by the tests, the profile and gpu_check's model sections: fail in seconds
$PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton',
triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" \
  >> "$STAGE/env.txt" 2>&1 || { cat "$STAGE/env.txt"; phase "no diffusers"; publish; exit 1; }
cat "$STAGE/env.txt"

# Minimum seconds each phase keeps when an earlier one runs long.
MIN_PROFILE=${MIN_PROFILE:-120} MIN_CHECK=${MIN_CHECK:-90}
AT=${AUTOTUNE:+--autotune}
# Test files that put something on a device (the rest run on the CPU alone: CI covers them).
GPU_TESTS=$(grep -l -E 'kernel_device|cuda|[^_]device\b' tests/test_*.py \
  | grep -v -E 'test_(compile|gpu_check|gpu_session|docs|examples)\.py')

# warm_jobs KIND: one line of arguments per warm-up process (their timings are thrown away)
warm_jobs() {
  if [ "$1" = profile ]; then
    local modes="bf16 w4a4 w8a8 w4a4-clq w4a4-clq-runs w4a4-clq-unfolded bf16-fused w4a4-fused
                 w8a8-fused w4a4-int8"
    [ -n "${SMOKE:-}" ] && modes="w4a4"
    for m in $modes; do echo "profile_forward.py --modes $m --reps 1"; done
  else
    local shapes="0 1 2 3" gmodes="w4a4-pc w4a4-g128 w4a4-g64 w4a8-pc w4a8-g128 w8a8-pc w8a8-g128"
    local d s m
    if [ -n "${SMOKE:-}" ]; then
      echo "gpu_check.py --sections correctness --dtypes bf16"; return
    fi
    for d in bf16 fp16 fp32; do echo "gpu_check.py --sections correctness --dtypes $d"; done
    for s in $shapes; do for m in $gmodes; do
      echo "gpu_check.py --sections gemm $AT --shapes $s --modes $m"; done; done
    for s in rotate linear pixart calibration; do echo "gpu_check.py --sections $s"; done
  fi
}

# warm_up SECONDS KIND...: the jobs of each KIND in parallel processes (Triton's disk cache
# keeps what they compile), each with its own tuning cache and output folder
warm_up() {
  local secs=$1; shift
  for k in "$@"; do warm_jobs "$k"; done > "$WARM/jobs"
  cat -n "$WARM/jobs" | timeout -k 10 "$secs" xargs -P "${JOBS:-8}" -L 1 sh -c \
    'i=$0; s=$1; shift; CLQ_CACHE_DIR='"$WARM"'/c$i '"$PY"' bench/$s '"$SMOKE_ARG"' \
     --budget 1000 --out '"$WARM"'/o$i "$@" > '"$WARM"'/log$i 2>&1 || echo "warm-up job $i failed"'
  echo "warm-up: $(wc -l < "$WARM/jobs") jobs until t = $(elapsed) s" | tee -a "$STAGE/phases.txt"
}

# phase1 SECONDS KIND...: the GPU tests (not in a smoke run) beside the warm-up of KINDs
phase1() {
  local secs=$1; shift
  phase "phase 1: tests beside the compile warm-up of $* (limit $secs s)"
  local tests=""
  if [ -z "${SMOKE:-}" ]; then
    # SIGINT at the limit: pytest still prints its summary of the failures so far
    # shellcheck disable=SC2086
    timeout -s INT -k 20 "$secs" $PY -m pytest $GPU_TESTS -q -n "${TEST_JOBS:-6}" \
      -p no:cacheprovider --timeout 150 -rfs --tb=short --durations 20 \
      > "$STAGE/pytest.log" 2>&1 &
    tests=$!
  fi
  warm_up "$secs" "$@"
  if [ -n "$tests" ]; then
    wait "$tests"
    note $? "pytest"
    echo "pytest exit $st at t = $(elapsed) s: $(tail -n 1 "$STAGE/pytest.log")" \
      | tee -a "$STAGE/phases.txt"
  fi
  publish
}

profile() {  # RESERVE: bf16 vs W4A4 vs W8A8, eager and CUDA graphs, by op family
  local secs; secs=$(limit 200 "$1")
  phase "profile_forward.py (limit $secs s)"
  timeout -k 10 "$secs" $PY bench/profile_forward.py $SMOKE_ARG --budget $(( secs * 3 / 4 )) \
    --out "$RESULTS" > "$STAGE/profile-forward.log" 2>&1
  note $? profile_forward.py
  echo "profile exit $st: $(tail -n 1 "$STAGE/profile-forward.log")" | tee -a "$STAGE/phases.txt"
  publish
}

check() {  # RESERVE
  local secs; secs=$(limit 150 "$1")
  phase "gpu_check.py (limit $secs s)"
  CLQ_CACHE_DIR="$STAGE/tuned" timeout -k 10 "$secs" $PY bench/gpu_check.py \
    $SMOKE_ARG $AT ${CHECK_SECTIONS:+--sections "$CHECK_SECTIONS"} --budget $(( secs * 3 / 4 )) \
    --out "$RESULTS" > "$STAGE/gpu-check.log" 2>&1
  note $? gpu_check.py
  echo "gpu_check exit $st: $(tail -n 1 "$STAGE/gpu-check.log")" | tee -a "$STAGE/phases.txt"
  publish
}

probe() {  # per tile rows / warps / precision, with the time left
  [ -n "${SMOKE:-}" ] && return
  local secs; secs=$(limit 240 5)
  phase "rotate_probe.py bf16 (limit $secs s)"
  timeout -k 5 "$secs" $PY bench/rotate_probe.py bf16 > "$RESULTS/rotate-probe-bf16.jsonl" \
    2> "$STAGE/rotate-probe.err"
  note $? rotate_probe.py
  $PY bench/rotate_probe.py --summary "$RESULTS/rotate-probe-bf16.jsonl" \
    > "$RESULTS/rotate-probe-summary.md" 2>> "$STAGE/rotate-probe.err"
  publish
}

case "$STEP" in
  all)
    phase1 "$(limit 150 $((MIN_PROFILE + MIN_CHECK)))" profile check
    profile "$MIN_CHECK"
    check 0
    probe ;;
  1)
    phase1 "$(limit 170 "$MIN_PROFILE")" profile
    profile 0 ;;
  2)
    phase "phase 1: compile warm-up of check"
    warm_up "$(limit 100 "$MIN_CHECK")" check
    check 0
    probe ;;
esac
phase "done${FAILED:+; failed or stopped at their limit:$FAILED}"
publish
[ -z "${FAILED:-}" ]
