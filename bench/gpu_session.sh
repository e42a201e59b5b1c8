#!/usr/bin/env bash
# A whole GPU session in one command (device time is scarce; compiling is most of it):
#   1. compile every kernel that gpu_check.py will launch, in parallel processes (Triton's disk
#      cache keeps them), while the whole test suite runs on the GPU (pytest -n);
#   2. run bench/profile_forward.py (where a PixArt-Σ- and a FLUX-sized forward spend their
#      time, eager and CUDA-graph-replayed), then gpu_check.py, each alone on the GPU so its
#      timings are not disturbed, then bench/rotate_probe.py (bf16).
# AUTOTUNE=1 adds gpu_check's --autotune (the shipped GEMM table vs autotuned picks; about
# 5 more minutes on an H100, and its picks did not reproduce on 2026-11-27): off by default.
# Usage, on a CUDA machine from the repository root (wheels in .whl/ are installed first):
#   bash bench/gpu_session.sh               # results: bench/results/ and $OUT
#   SMOKE=1 bash bench/gpu_session.sh       # the same steps on tiny shapes in the interpreter
# Times: WARM_S (phase 1 limit, default 200), CHECK_BUDGET (gpu_check --budget, default 170),
# PROBE_S (rotate_probe.py, default 240).
set -u
OUT=${OUT:-/tmp/gpu-session-out}
WARM=${WARM:-/tmp/clq-warm}
mkdir -p "$OUT" "$WARM"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
SMOKE_ARG=""
AT=${AUTOTUNE:+--autotune}
if [ -n "${SMOKE:-}" ]; then
  export TRITON_INTERPRET=1
  SMOKE_ARG="--smoke"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    > "$OUT/nvidia-smi.txt"
fi
$PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton',
triton.__version__, 'diffusers', diffusers.__version__)"

echo "== phase 1: parallel compile warm-up + tests ($(date -u +%T))"
MODES="w4a4-pc w4a4-g128 w4a4-g64 w4a8-pc w4a8-g128 w8a8-pc w8a8-g128"
if [ -n "${SMOKE:-}" ]; then SHAPES=${SHAPES:-0}; fi  # --smoke has one GEMM shape
SHAPES=${SHAPES:-"0 1 2 3"}
{
  for d in bf16 fp16 fp32; do echo "--sections correctness --dtypes $d"; done
  for s in $SHAPES; do for m in $MODES; do
    echo "--sections gemm $AT --shapes $s --modes $m"; done; done
  for s in rotate linear pixart calibration; do echo "--sections $s"; done
} > "$WARM/jobs"
if [ -z "${SMOKE:-}" ]; then
  # SIGINT at the limit: pytest still prints its summary of the failures so far
  # the whole suite (CUDA-only tests included: calibration of a CUDA model, device guards,
  # CUDA graphs), not only the kernel tests
  timeout -s INT -k 20 "${TESTS_S:-300}" $PY -m pytest tests -q -n 6 -p no:cacheprovider \
    --timeout 200 -rfs --tb=short > "$OUT/pytest.log" 2>&1 &
  TESTS=$!
fi
# each job: its own tuning cache and output folder (its timings are thrown away)
cat -n "$WARM/jobs" | timeout "${WARM_S:-200}" xargs -P "${JOBS:-10}" -L 1 sh -c \
  'i=$0; env -u OUT CLQ_CACHE_DIR='"$WARM"'/c$i '"$PY"' bench/gpu_check.py '"$SMOKE_ARG"' \
   --budget 1000 --out '"$WARM"'/o$i "$@" > '"$WARM"'/log$i 2>&1 || echo "job $i failed"'
echo "warm-up done ($(date -u +%T))"
if [ -n "${TESTS:-}" ]; then
  wait "$TESTS"; echo "pytest exit $? ($(date -u +%T))"; tail -5 "$OUT/pytest.log"
fi
tar czf "$OUT/warm-logs.tgz" -C "$WARM" . 2>/dev/null

echo "== phase 2: where the forward's time goes, then gpu_check, alone ($(date -u +%T))"
if [ -z "${SMOKE:-}" ]; then  # bf16 vs W4A4 vs W8A8, eager and CUDA graphs, by op family
  timeout "${PROFILE_S:-240}" $PY bench/profile_forward.py --budget "${PROFILE_BUDGET:-200}" \
    --out "${RESULTS:-bench/results}" > "$OUT/profile-forward.log" 2>&1
  echo "profile exit $?"; tail -3 "$OUT/profile-forward.log"
fi
CLQ_CACHE_DIR="$OUT/tuned" $PY bench/gpu_check.py $SMOKE_ARG $AT \
  --budget "${CHECK_BUDGET:-170}" --out "${RESULTS:-bench/results}"
if [ -z "${SMOKE:-}" ]; then  # rotate+quantize per tile rows / warps / precision
  timeout "${PROBE_S:-240}" $PY bench/rotate_probe.py bf16 > "$OUT/rotate-probe-bf16.jsonl" 2>&1
fi
echo "done ($(date -u +%T))"
