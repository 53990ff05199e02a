"""sglang_nemodiff: serve NVIDIA Nemotron-Labs Diffusion models with stock SGLang.

`register()` is the `sglang.srt.plugins` entry point: SGLang runs it in every process (launcher,
scheduler/TP workers, detokenizer). Importing this package imports nothing from SGLang, so the
references and kernels (`sglang_nemodiff.reference`, `sglang_nemodiff.kernels`) work without it.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the NLD config, model class, algorithms and patches (idempotent)."""
    global _registered
    if _registered:
        return
    import sys

    from sglang_nemodiff.patches import PatchTargetMissing, apply_all

    try:
        apply_all()
    except PatchTargetMissing as exc:
        # SGLang's plugin loader logs and swallows exceptions; a half-applied plugin would fail
        # later and obscurely, so stop here with the one message that explains it.
        print(f"sglang_nemodiff: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    _register_config()
    _register_model()
    _register_algorithms()
    _registered = True


def _register_config() -> None:
    from transformers import AutoConfig

    from sglang_nemodiff.config import MODEL_TYPE, NemotronLabsDiffusionConfig

    try:
        AutoConfig.register(MODEL_TYPE, NemotronLabsDiffusionConfig)
    except ValueError:  # already registered (e.g. by a newer transformers)
        pass


def _register_model() -> None:
    from sglang.srt.models.registry import ModelRegistry

    from sglang_nemodiff.model import NemotronLabsDiffusionModel

    ModelRegistry.models[NemotronLabsDiffusionModel.__name__] = NemotronLabsDiffusionModel


def _register_algorithms() -> None:
    from sglang.srt.dllm.algorithm import algo_name_to_cls

    from sglang_nemodiff.algorithms import algorithm_classes

    algo_name_to_cls.update(algorithm_classes())
