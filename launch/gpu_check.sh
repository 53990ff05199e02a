#!/usr/bin/env bash
# One-shot GPU check for a lent card (torch + Triton only: no SGLang, no network; ~5-8 minutes on
# an H100): the kernel tests compiled for the card, the kernel benchmark at NLD-8B shapes against
# SDPA and the memory floor, and the reference model's forward at NLD-8B shapes (random bf16
# weights) by query tokens for the verify, draft and quadratic passes, eager and under one CUDA
# graph per size (the pass kind is data the graph reads). Writes $OUT/gpu_check.md (the card's
# name in each table) for docs/perf.md.
#
#   bash launch/gpu_check.sh            # on the GPU machine
#   bash launch/gpu_check.sh --smoke    # the same steps on this CPU with tiny shapes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STATUS=0
# One step: its output goes to the terminal and to $OUT/<name>.log; a failure or a timeout is
# recorded and the check goes on (a lent card comes once: one broken step must not lose the rest).
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "step $name FAILED (exit $rc; 124 = over its ${limit}s limit)" | tee -a "$OUT/failures.txt"
    STATUS=1
  fi
}
if [ "${1:-}" = "--smoke" ]; then
  step kernels 600 "$PY" launch/bench_kernels.py --smoke-cpu --out "$OUT/kernels.md"
  step forward 600 "$PY" launch/gpu_forward_bench.py --smoke --out "$OUT/forward.md"
else
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" \
    | tee "$OUT/device.txt"
  if "$PY" -c "import pytest" 2>/dev/null; then
    step kernel_tests 180 "$PY" -m pytest -q -p no:cacheprovider --tb=short \
      tests/test_kernels.py tests/test_forward_timing.py
  else
    echo "pytest is not installed here: kernel tests skipped" | tee "$OUT/kernel_tests.log"
  fi
  step kernels 150 "$PY" launch/bench_kernels.py --out "$OUT/kernels.md"
  step forward 180 "$PY" launch/gpu_forward_bench.py --out "$OUT/forward.md"
fi
{
  echo "# GPU check ($(date -u +%Y-%m-%d))"
  echo
  [ -f "$OUT/device.txt" ] && { cat "$OUT/device.txt"; echo; }
  [ -f "$OUT/kernel_tests.log" ] && { echo '```'; tail -3 "$OUT/kernel_tests.log"; echo '```'; echo; }
  [ -f "$OUT/failures.txt" ] && { echo '```'; cat "$OUT/failures.txt"; echo '```'; echo; }
  [ -f "$OUT/kernels.md" ] && cat "$OUT/kernels.md"
  echo
  [ -f "$OUT/forward.md" ] && cat "$OUT/forward.md"
} > "$OUT/gpu_check.md"
echo "wrote $OUT/gpu_check.md"
exit $STATUS
