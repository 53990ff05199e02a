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


MODEL_NAMES = ("nld-tiny", "smol")


def model_path(name: str) -> str:
    """A bundled model by name: `nld-tiny` (inside the package) or `smol` (SmolLM2-135M-Instruct
    converted into a cache directory on first use, see smol.py)."""
    if name == BUNDLED_MODEL_NAME:
        return bundled_model_path()
    if name == "smol":
        from sglang_nemodiff.bundled.smol import smol_model_path

        return smol_model_path()
    raise ValueError(f"unknown bundled model {name!r}: one of {', '.join(MODEL_NAMES)}")
