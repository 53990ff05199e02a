#!/usr/bin/env bash
# Install (if needed), then serve the bundled NLD model in each mode and show it answering.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
. .venv/bin/activate
python launch/demo.py "$@"
