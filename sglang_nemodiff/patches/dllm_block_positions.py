"""Block positions at the round's block size. `ForwardBatch.init_new` lays out a DLLM_EXTEND
batch's positions (and prompt mask) as `dllm_config.block_size` slots per request; a LinearSpec
round under `block_size: auto` may use fewer (block_policy.py). The batch is built with a copy
of the config that carries the round's B, which every request of the round shares."""

from __future__ import annotations

import copy

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",)


def init_new(original, cls, batch, model_runner, *args, **kwargs):
    config = getattr(batch, "dllm_config", None)
    if (config is None or not is_nemodiff_algorithm(config.algorithm)
            or not batch.forward_mode.is_dllm_extend() or not batch.reqs):
        return original(cls, batch, model_runner, *args, **kwargs)
    block_size = batch.reqs[0].extend_end - batch.reqs[0].dllm_block_offset
    assert all(r.extend_end - r.dllm_block_offset == block_size for r in batch.reqs), \
        "the requests of one round share its block size"
    if block_size == config.block_size:
        return original(cls, batch, model_runner, *args, **kwargs)
    batch.dllm_config = copy.copy(config)
    batch.dllm_config.block_size = block_size
    try:
        return original(cls, batch, model_runner, *args, **kwargs)
    finally:
        batch.dllm_config = config


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_new, HookType.AROUND)
