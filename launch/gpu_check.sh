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
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ "${1:-}" = "--smoke" ]; then
  "$PY" launch/bench_kernels.py --smoke-cpu --out "$OUT/kernels.md"
  "$PY" launch/gpu_forward_bench.py --smoke --out "$OUT/forward.md"
else
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_forward_timing.py \
      | tee "$OUT/kernel_tests.txt" || echo "kernel tests FAILED (see $OUT/kernel_tests.txt)"
  else
    echo "pytest is not installed here: kernel tests skipped" | tee "$OUT/kernel_tests.txt"
  fi
  "$PY" launch/bench_kernels.py --out "$OUT/kernels.md"
  "$PY" launch/gpu_forward_bench.py --out "$OUT/forward.md"
fi
{
  echo "# GPU check ($(date -u +%Y-%m-%d))"
  echo
  [ -f "$OUT/kernel_tests.txt" ] && { echo '```'; tail -3 "$OUT/kernel_tests.txt"; echo '```'; echo; }
  cat "$OUT/kernels.md"
  echo
  cat "$OUT/forward.md"
} > "$OUT/gpu_check.md"
echo "wrote $OUT/gpu_check.md"
