#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on CPU. Fails if no test ran (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh || exit 1
. .venv/bin/activate
python -m pytest -v --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
