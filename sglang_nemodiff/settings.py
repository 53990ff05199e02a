"""Algorithm settings: one YAML file (`--algorithm-config`), defaults in configs/default.yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.yaml")


@dataclass(frozen=True)
class AlgorithmSettings:
    block_size: int = 32
    threshold: float = 0.9
    use_lora: bool = True
    lora_path: str | None = None
    draft_sampling: str = "sample"

    @classmethod
    def from_mapping(cls, raw: dict | None, source: str = "algorithm config") -> "AlgorithmSettings":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        settings = cls(**raw)
        if not isinstance(settings.block_size, int) or settings.block_size < 2:
            raise ValueError(f"{source}: block_size must be an integer >= 2")
        if not 0.0 < float(settings.threshold) <= 1.0:
            raise ValueError(f"{source}: threshold must be in (0, 1]")
        if settings.draft_sampling not in ("sample", "argmax"):
            raise ValueError(f"{source}: draft_sampling must be 'sample' or 'argmax'")
        return settings


def load_settings(path: str | None) -> AlgorithmSettings:
    import yaml

    path = path or DEFAULT_CONFIG
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the algorithm config must be a YAML mapping")
    return AlgorithmSettings.from_mapping(raw, path)


def current_settings() -> AlgorithmSettings:
    """The settings of this SGLang process (from `--dllm-algorithm-config`, else defaults)."""
    try:
        from sglang.srt.runtime_context import get_exec

        path = get_exec().dllm.dllm_algorithm_config
    except Exception:  # not inside an SGLang process
        path = None
    return load_settings(path)
