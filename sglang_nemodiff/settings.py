"""Algorithm settings: one YAML file (`--algorithm-config`), defaults in configs/default.yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.yaml")


BLOCK_SIZES = (1, 2, 4, 8, 16, 32)  # what `block_size: auto` chooses from (up to the checkpoint's)


@dataclass(frozen=True)
class AlgorithmSettings:
    # LinearSpec: "auto" picks the block size per batch (block_policy.py), at most the
    # checkpoint's; a number fixes it. Quadratic: b ("auto": 16 within the checkpoint's,
    # patches/dllm_config.py). FastDiffuser always uses the checkpoint's block size.
    block_size: int | str = "auto"
    threshold: float = 0.9
    use_lora: bool = True
    lora_path: str | None = None
    # FastDiffuser: run its denoise passes with the draft adapter too (they are bidirectional
    # passes over [seed, MASK...] blocks, like LinearSpec's draft). Off by default: a checkpoint's
    # adapter is trained for LinearSpec drafts; the causal refresh pass never uses it.
    denoise_lora: bool = False
    draft_sampling: str = "sample"
    # LinearSpec: AR steps one B = 1 round takes (each an AR decode step; the scheduler's round
    # work is paid once per round), at most the largest block size.
    ar_steps: int = 4
    # Quadratic: draft groups after the first N block tokens only (sparse quadratic,
    # quadratic_layout.py); null: after every one (b (b + 1) query tokens per request).
    quadratic_groups: int | None = None
    # Graph-safe passes (model.py, pass_kind.py): the pass kind is data the forward reads, so
    # SGLang's CUDA graphs may stay on for the diffusion modes (on CUDA; a CPU server has no
    # dLLM graphs to capture and runs the same passes eagerly). Needs --attention-backend
    # nemodiff. Off by default until a GPU has validated the served graphs (docs/gpu.md).
    cuda_graphs: bool = False
    # Testing/diagnosis: block sizes used in turn, one per round, instead of the policy's choice.
    block_size_cycle: tuple | None = None

    @classmethod
    def from_mapping(cls, raw: dict | None, source: str = "algorithm config") -> "AlgorithmSettings":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        if isinstance(raw.get("block_size_cycle"), list):
            raw["block_size_cycle"] = tuple(raw["block_size_cycle"])
        settings = cls(**raw)
        if settings.block_size != "auto" and (
                not isinstance(settings.block_size, int) or isinstance(settings.block_size, bool)
                or settings.block_size < 2):
            raise ValueError(f"{source}: block_size must be 'auto' or an integer >= 2")
        if settings.block_size_cycle is not None and (
                not settings.block_size_cycle
                or any(not isinstance(b, int) or b < 1 for b in settings.block_size_cycle)):
            raise ValueError(f"{source}: block_size_cycle must be a list of integers >= 1")
        if not isinstance(settings.ar_steps, int) or isinstance(settings.ar_steps, bool) or settings.ar_steps < 1:
            raise ValueError(f"{source}: ar_steps must be an integer >= 1")
        if settings.quadratic_groups is not None and (
                not isinstance(settings.quadratic_groups, int) or isinstance(settings.quadratic_groups, bool)
                or settings.quadratic_groups < 1):
            raise ValueError(f"{source}: quadratic_groups must be null or an integer >= 1")
        if not isinstance(settings.cuda_graphs, bool):
            raise ValueError(f"{source}: cuda_graphs must be true or false")
        if settings.denoise_lora and not settings.use_lora:
            raise ValueError(f"{source}: denoise_lora needs the draft adapter (use_lora: true)")
        if not 0.0 < float(settings.threshold) <= 1.0:
            raise ValueError(f"{source}: threshold must be in (0, 1]")
        if settings.draft_sampling not in ("sample", "argmax"):
            raise ValueError(f"{source}: draft_sampling must be 'sample' or 'argmax'")
        return settings


def max_block_size(settings: AlgorithmSettings, checkpoint_block_size: int, source: str) -> int:
    """The largest block a round may use: the checkpoint's (trained) block size, or a fixed
    block_size, which may not exceed it."""
    if settings.block_size == "auto":
        return checkpoint_block_size
    if settings.block_size > checkpoint_block_size:
        raise ValueError(f"{source}: block_size {settings.block_size} exceeds the checkpoint's "
                         f"block_size {checkpoint_block_size} (config.json)")
    return settings.block_size


def load_settings(path: str | None) -> AlgorithmSettings:
    import yaml

    path = path or DEFAULT_CONFIG
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the algorithm config must be a YAML mapping")
    return AlgorithmSettings.from_mapping(raw, path)


def current_settings() -> AlgorithmSettings:
    """The settings of this SGLang process (`--dllm-algorithm-config`), defaults outside one. Only
    "no SGLang config here" falls back to defaults; a config that cannot be read raises, so a
    model never, e.g., loads the draft LoRA that the YAML turns off."""
    try:
        from sglang.srt.runtime_context import get_exec

        path = get_exec().dllm.dllm_algorithm_config
    except (ImportError, ValueError):  # not inside an SGLang process: no published config
        path = None
    return load_settings(path)
