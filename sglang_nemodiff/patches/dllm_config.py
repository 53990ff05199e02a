"""`DllmConfig.from_server_args` knows block size and mask id only for a hard-coded table of
models; for the plugin's algorithms they come from the NLD checkpoint and the algorithm YAML.

The quadratic mode's round shape is decided here too, once: its block b (a number in the YAML's
block_size; under `auto` the largest b the policy may choose, NLD's 16 within the checkpoint's)
and the group of masks after each block token, which depends on the checkpoint's draft
convention (quadratic_layout.py). The config carries the layout (`NemodiffDllmConfig.quadratic`:
the fixed round's, or under `auto` the widest candidate's, quadratic_policy.py) to the planner, and the tokens a
round places at most (`round_slots`) to the scheduler's budgets."""

from __future__ import annotations

from dataclasses import asdict

from sglang.srt.dllm.config import DllmConfig
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.dllm.config.DllmConfig.from_server_args",)


def is_nemodiff_algorithm(name) -> bool:
    from sglang_nemodiff.algorithms import ALGORITHMS

    return name is not None and name in ALGORITHMS.values()


QUADRATIC_DEFAULT_BLOCK = 16  # NLD's quadratic block size, when the YAML says `auto`


class NemodiffDllmConfig(DllmConfig):
    """SGLang's DllmConfig plus the quadratic round layout (None in the other modes).
    `block_size` stays the NLD block (SGLang also makes it the KV page size); `round_slots` is
    what a round places per request, which the scheduler must budget (patches/dllm_kv_pressure.py,
    patches/dllm_scheduler_finish.py): a quadratic round's L (1 + group) tokens."""

    def __init__(self, *args, quadratic=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quadratic = quadratic

    @property
    def round_slots(self) -> int:
        return self.quadratic.tokens if self.quadratic is not None else self.block_size


def round_slots(dllm_config) -> int:
    """KV slots one round places per request, at most (any DllmConfig)."""
    return getattr(dllm_config, "round_slots", dllm_config.block_size)


def from_server_args(original, server_args):
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang_nemodiff.algorithms import mode_of
    from sglang_nemodiff.config import ARCHITECTURE
    from sglang_nemodiff.quadratic_layout import QuadraticLayout
    from sglang_nemodiff.quadratic_policy import largest_auto_layout
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
    checkpoint_block = getattr(hf_config, "block_size", 32)
    source = cfg.dllm_algorithm_config or "algorithm config"
    quadratic = None
    if mode_of(cfg.dllm_algorithm) == "quadratic":
        if settings.block_size_cycle is not None:
            raise ValueError(f"{source}: block_size_cycle is not supported by --algorithm quadratic")
        if settings.block_size == "auto":  # the policy chooses b <= 16 and the groups per batch
            if settings.quadratic_groups is not None:
                raise ValueError(f"{source}: quadratic_groups fixes the groups of a fixed "
                                 "block_size; under block_size: auto the policy chooses them")
            block_size = min(QUADRATIC_DEFAULT_BLOCK, checkpoint_block)
            shift = bool(getattr(hf_config, "shift_logits", False))
            quadratic = largest_auto_layout(block_size, shift)
        else:
            block_size = max_block_size(settings, checkpoint_block, source)
            shift = bool(getattr(hf_config, "shift_logits", False))
            quadratic = QuadraticLayout.for_checkpoint(block_size, shift, settings.quadratic_groups)
    else:
        block_size = max_block_size(settings, checkpoint_block, source)
    return NemodiffDllmConfig(
        algorithm=cfg.dllm_algorithm,
        algorithm_config=asdict(settings),
        block_size=block_size,  # the largest block; LinearSpec's rounds may use less
        mask_id=hf_config.mask_token_id,
        max_running_requests=cfg.max_running_requests or 1,
        first_done_first_out_mode=False,  # a round always resolves its block
        requires_separate_context_encoding=True,
        quadratic=quadratic,
    )


def apply() -> None:
    HookRegistry.register(TARGETS[0], from_server_args, HookType.AROUND)
