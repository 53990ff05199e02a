"""Keep the causal KV of a block's accepted prefix. Stock SGLang frees all block KV after a
separate-context round; an NLD round's last pass is causal, so its first `keep` slots (seed and
accepted tokens) are valid cache: keep them, free the rest. No re-encoding pass is needed."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._stash_dllm_context",)


def stash_dllm_context(original, scheduler, req):
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return original(scheduler, req)
    round_result = req.nemodiff_round
    assert req.extend_end == req.dllm_block_offset + round_result.block_size
    keep = round_result.keep
    context_len = req.dllm_block_offset + keep
    # Invariant: everything committed but the new seed is cached.
    assert context_len == len(req.origin_input_ids) + len(req.output_ids) - 1, (
        req.rid, context_len, len(req.origin_input_ids), len(req.output_ids))
    allocated_len = req.kv.kv_allocated_len
    page_size = scheduler.token_to_kv_pool_allocator.page_size
    free_start = -(-context_len // page_size) * page_size
    if free_start < allocated_len:
        slots = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, free_start:allocated_len]
        scheduler.token_to_kv_pool_allocator.free_segment(slots, start_pos=free_start)
    req.kv.kv_committed_len = context_len
    req.kv.kv_allocated_len = context_len
    assert req.kv.max_evicted_seqlen <= context_len
    # The radix tree keys the kept KV on these ids: the real tokens, not the block's masks.
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
    req.extend_end = context_len
    scheduler.stash_chunked_request(req)


def apply() -> None:
    HookRegistry.register(TARGETS[0], stash_dllm_context, HookType.AROUND)
