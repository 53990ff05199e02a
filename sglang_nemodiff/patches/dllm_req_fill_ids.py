"""Place an NLD block at the seed. SGLang's separate-context dLLM path appends the block after all
committed tokens; NLD's block is `[seed, MASK × (B-1)]` where the seed is the last committed token
and is not yet in the KV cache (see algorithms/base.py)."""

from __future__ import annotations

from array import array

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.dllm.mixin.req.ReqDllmMixin._init_fill_ids_for_dllm",)


def init_fill_ids_for_dllm(original, req):
    if not is_nemodiff_algorithm(req.dllm_config.algorithm) or not req.output_ids:
        # No seed yet: the (chunked) causal prefill of the prompt runs as in stock SGLang.
        return original(req)
    committed = req.origin_input_ids + req.output_ids
    block_size = req.dllm_config.block_size
    req.dllm_block_offset = len(committed) - 1
    req.full_untruncated_fill_ids = committed + array("q", [req.dllm_config.mask_id] * (block_size - 1))
    req.dllm_initialized = True


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_fill_ids_for_dllm, HookType.AROUND)
