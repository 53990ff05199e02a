"""`python -m sglang_nemodiff.bundled [nld-tiny|smol]`: print a bundled checkpoint's path
(nld-tiny by default; smol converts SmolLM2-135M-Instruct on first use)."""

import sys

from sglang_nemodiff.bundled import model_path

print(model_path(sys.argv[1] if len(sys.argv) > 1 else "nld-tiny"))
