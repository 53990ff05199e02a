"""Keep the causal KV of a block's accepted prefix. Stock SGLang frees all block KV after a
separate-context round; an NLD round's last pass is causal, so its first `keep` slots (seed and
accepted tokens) are valid cache: keep them, free the rest. No re-encoding pass is needed.

Then the request's KV is checkpointed into the radix tree, as stock SGLang does after every dLLM
round, except when that checkpoint would publish nothing: the tree stores whole pages
(page size = the checkpoint's block size), so a round that completes no new page (31 of every 32
one-token rounds, B = 1) would re-walk the same path and re-take the same lock. Skipping it took
~8% of a B = 1 round's time at concurrency 32 on the bundled model."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = (
    "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._stash_dllm_context",
    # what _checkpoint_adds_nothing reads
    "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint_into_tree",
    "sglang.srt.mem_cache.unified_cache.components.base.BASE_COMPONENT_TYPE",
    "sglang.srt.mem_cache.common.checkpoint_kv_cache",
)


def _checkpoint_adds_nothing(scheduler, req) -> bool:
    """Whether `checkpoint_kv_cache(req)` would leave the tree and the request as they are: a
    plain (non-session, single-component) radix tree, a request that already inserted and
    protects every whole page up to its committed length."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.mem_cache.unified_cache.components.base import BASE_COMPONENT_TYPE
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    tree = scheduler.tree_cache
    if (type(tree) is not UnifiedRadixCache or tree.disable or req.session_id is not None
            or scheduler.disaggregation_mode != DisaggregationMode.NULL or req.finished()
            or req.skip_radix_cache_insert):
        return False
    components = tree._components_tuple
    if len(components) != 1 or components[0].component_type != BASE_COMPONENT_TYPE:
        return False
    whole_pages = req.extend_end // tree.page_size * tree.page_size
    return whole_pages == req.kv.cache_protected_len == req.kv.cache_inserted_len


def stash_dllm_context(original, scheduler, req):
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return original(scheduler, req)
    round_result = req.nemodiff_round
    assert req.extend_end == req.dllm_block_offset + req.nemodiff_plan.slots  # the round's plan
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
    if _checkpoint_adds_nothing(scheduler, req):
        req.prefix_len = req.extend_end  # what checkpoint_kv_cache leaves besides the tree
    else:
        scheduler.stash_chunked_request(req)


def apply() -> None:
    HookRegistry.register(TARGETS[0], stash_dllm_context, HookType.AROUND)
