"""The bundled small NLD checkpoint (`nld-tiny/`), trained by `launch/train_bundled_model.py`.

`bundled_model_path()` is the directory to pass as `--model-path`; `python -m sglang_nemodiff.bundled`
prints it.
"""

from __future__ import annotations

import os

BUNDLED_MODEL_NAME = "nld-tiny"


def bundled_model_path() -> str:
    """Absolute path of the bundled checkpoint directory (real HF layout)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), BUNDLED_MODEL_NAME)
