"""`DllmConfig.from_server_args` knows block size and mask id only for a hard-coded table of
models; for the plugin's algorithms they come from the NLD checkpoint and the algorithm YAML."""

from __future__ import annotations

from dataclasses import asdict

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.dllm.config.DllmConfig.from_server_args",)


def is_nemodiff_algorithm(name) -> bool:
    from sglang_nemodiff.algorithms import ALGORITHMS

    return name is not None and name in ALGORITHMS.values()


def from_server_args(original, server_args):
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.dllm.config import DllmConfig

    from sglang_nemodiff.config import ARCHITECTURE
    from sglang_nemodiff.settings import load_settings, max_block_size

    cfg = resolving_view(server_args)
    if not is_nemodiff_algorithm(cfg.dllm_algorithm):
        return original(server_args)
    model_config = ModelConfig.from_server_args(server_args, model_path=cfg.model_path,
                                                model_revision=cfg.revision)
    hf_config = model_config.hf_config
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if arch != ARCHITECTURE:
        raise ValueError(f"--dllm-algorithm {cfg.dllm_algorithm} serves {ARCHITECTURE} "
                         f"checkpoints; {cfg.model_path} is {arch}")
    settings = load_settings(cfg.dllm_algorithm_config)
    block_size = max_block_size(settings, getattr(hf_config, "block_size", 32),
                                cfg.dllm_algorithm_config or "algorithm config")
    return DllmConfig(
        algorithm=cfg.dllm_algorithm,
        algorithm_config=asdict(settings),
        block_size=block_size,  # the largest block; LinearSpec's rounds may use less
        mask_id=hf_config.mask_token_id,
        max_running_requests=cfg.max_running_requests or 1,
        first_done_first_out_mode=False,  # a round always resolves its block
        requires_separate_context_encoding=True,
    )


def apply() -> None:
    HookRegistry.register(TARGETS[0], from_server_args, HookType.AROUND)
