"""KV pressure in the diffusion modes: admission that reserves room to grow, decode rounds that
run when a prefill cannot, and retraction when nothing can run.

Stock SGLang 0.5.23 dLLM scheduling has no retraction and tries prefills before blocks: once the
pool is full of prompts, no request can get the page a block needs and the scheduler spins
forever. For the NLD modes (each round needs one new page per request):

- Admission: requests already in the dLLM queue that hold KV reserve their expected growth
  (remaining new tokens x SGLang's new-token ratio, clipped like AR's decode reservation, plus
  one block) in the prefill budget, so new prompts are admitted only while that fits.
- A round whose prefill admitted nothing falls back to the waiting blocks.
- If still nothing can run, the request with the fewest generated tokens is retracted: its KV is
  freed, its outputs kept, and it goes back to the waiting queue to be re-encoded later (the
  same recovery AR decoding uses). The last KV holder is never retracted; if even it cannot get
  a block, it is finished with an error naming the pool size.
"""

from __future__ import annotations

import logging
from array import array
from http import HTTPStatus

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm, round_slots

logger = logging.getLogger("sglang_nemodiff")

_MIXIN = "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin"
TARGETS = (
    f"{_MIXIN}._create_dllm_prefill_adder",
    f"{_MIXIN}._process_dllm_batches",
    f"{_MIXIN}.get_new_batch_dllm",
    f"{_MIXIN}._process_batch_by_phase",
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
    "sglang.srt.managers.schedule_batch.release_req",
    "sglang.srt.managers.schedule_batch.FINISH_ABORT",
    "sglang.srt.managers.schedule_policy.CLIP_MAX_NEW_TOKENS",
    "sglang.srt.dllm.mixin.req.DllmReqPhase",
)


def _holders(scheduler):
    """dLLM-queued requests that hold KV rows (prefilled or mid-prefill)."""
    return [r for r in scheduler.dllm_manager.waiting_queue
            if not r.finished() and r.kv.holds_kv]


def _growth(req, block_size: int, ratio: float) -> int:
    """KV a request is expected to still need: its remaining new tokens (clipped and scaled
    like AR's decode reservation; all of them with ignore_eos) plus one block of headroom."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    sp = req.sampling_params
    left = max(0, min(sp.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS))
    return int(left * (1.0 if sp.ignore_eos else ratio)) + block_size


def create_dllm_prefill_adder(original, scheduler, running_bs, running_batch):
    adder = original(scheduler, running_bs, running_batch)
    if is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        # A round places up to round_slots tokens per request (a quadratic round more than its
        # block): the adder must stage them all, and reserve room for them.
        adder.dllm_block_size = round_slots(scheduler.dllm_config)
        adder.nemodiff_ratio = scheduler.new_token_ratio_tracker.current
        adder.nemodiff_reserve = sum(
            _growth(req, adder.dllm_block_size, adder.nemodiff_ratio)
            for req in _holders(scheduler))
    return adder


def add_one_req(original, adder, req, *args, **kwargs):
    """Admit a new prompt only if the pool also holds the growth reserved by every request that
    already holds KV, and reserve this one's growth for the rest of the round (stock SGLang
    reserves none for dLLM admissions). Only prompt admission sees the reserve: the blocks of
    admitted requests are budgeted as in stock SGLang."""
    reserve = getattr(adder, "nemodiff_reserve", None)
    if reserve is None:
        return original(adder, req, *args, **kwargs)
    admitted_before = len(adder.can_run_list)
    adder.memory_budget.total_offset += reserve
    try:
        result = original(adder, req, *args, **kwargs)
    finally:
        adder.memory_budget.total_offset -= reserve
    if len(adder.can_run_list) > admitted_before:
        adder.nemodiff_reserve += _growth(req, adder.dllm_block_size, adder.nemodiff_ratio)
    return result


def process_dllm_batches(original, scheduler, adder, running_batch):
    mode = original(scheduler, adder, running_batch)
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return mode
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    if not adder.can_run_list and mode.is_extend() and not mode.is_dllm_extend():
        # The prefill admitted nothing (no room): the requests waiting for a block run instead.
        decode_reqs = scheduler.dllm_manager.get_decode_requests()
        if decode_reqs:
            scheduler._process_batch_by_phase(adder, decode_reqs, DllmReqPhase.STAGING_DECODE,
                                              DllmReqPhase.INCOMING_DECODE,
                                              running_batch=running_batch)
        if adder.can_run_list:
            mode = ForwardMode.DLLM_EXTEND
    # An incoming request that was refused still had its phase advanced to STAGING_PREFILL
    # (init_next_round_input runs before admission); as "staging" it would next be admitted
    # against the remaining pool without the growth reservation. It holds no KV: incoming again,
    # and uninitialised again, as it arrived. Left initialised, its next init_next_round_input
    # takes it for a request that finished a round: stock SGLang appends a block of fill ids
    # after the prompt, which lifts the prefix-match limit to the whole prompt; a block-aligned
    # prompt already in the radix cache then matched in full, was staged as a decode in the
    # prefill batch and crashed the KV stash (no block round result).
    admitted = {id(r) for r in adder.can_run_list}
    for req in scheduler.dllm_manager.waiting_queue:
        if (req.dllm_phase == DllmReqPhase.STAGING_PREFILL and not req.kv.holds_kv
                and id(req) not in admitted):
            req.dllm_phase = DllmReqPhase.INCOMING_PREFILL
            req.dllm_initialized = False
    return mode


def get_new_batch_dllm(original, scheduler, running_batch):
    batch = original(scheduler, running_batch)
    if (batch is not None or not is_nemodiff_algorithm(scheduler.dllm_config.algorithm)
            or scheduler.dllm_manager.is_empty()):
        return batch
    holders = _holders(scheduler)
    page = scheduler.token_to_kv_pool_allocator.page_size
    free = (scheduler.token_to_kv_pool_allocator.available_size()
            + scheduler.tree_cache.evictable_size())
    if not holders or free >= 2 * page + round_slots(scheduler.dllm_config):
        return None  # not a memory stall
    if len(holders) == 1:
        _abort_unfittable(scheduler, holders[0], free)
        return None
    victim = min(holders, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
    _retract(scheduler, victim, len(holders))
    return original(scheduler, running_batch)


def _retract(scheduler, req, holders_left: int):
    from sglang.srt.dllm.mixin.req import DllmReqPhase
    from sglang.srt.managers.schedule_batch import release_req

    before = scheduler.token_to_kv_pool_allocator.available_size()
    release_req(req=req, remaing_req_count=holders_left - 1,
                req_to_token_pool=scheduler.req_to_token_pool,
                token_to_kv_pool_allocator=scheduler.token_to_kv_pool_allocator,
                tree_cache=scheduler.tree_cache, hisparse_coordinator=None, offload_kv=False)
    req.dllm_phase = DllmReqPhase.INCOMING_PREFILL
    req.dllm_incomplete_ids = array("q")
    manager = scheduler.dllm_manager
    manager.waiting_queue = [r for r in manager.waiting_queue if r is not req]
    scheduler._add_request_to_queue(req, is_retracted=True)
    logger.warning("[nemodiff] KV cache pool is full: retracted request %s (%d prompt + %d "
                   "generated tokens kept, re-encoded when it is scheduled again); freed %d "
                   "tokens", req.rid, len(req.origin_input_ids), len(req.output_ids),
                   scheduler.token_to_kv_pool_allocator.available_size() - before)


def _abort_unfittable(scheduler, req, free: int):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    message = (f"The KV cache pool ({scheduler.token_to_kv_pool_allocator.size} tokens) cannot "
               f"hold this request's next {round_slots(scheduler.dllm_config)}-token round after "
               f"{len(req.origin_input_ids) + len(req.output_ids)} tokens; raise "
               "--max-total-tokens or lower max_new_tokens.")
    logger.error("[nemodiff] finishing request %s: %s", req.rid, message)
    req.finished_reason = FINISH_ABORT(message, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    scheduler._finish_dllm_request_if_needed(req)
    scheduler.output_streamer.stream_output([req], req.return_logprob)


def apply() -> None:
    HookRegistry.register(TARGETS[0], create_dllm_prefill_adder, HookType.AROUND)
    HookRegistry.register(TARGETS[1], process_dllm_batches, HookType.AROUND)
    HookRegistry.register(TARGETS[2], get_new_batch_dllm, HookType.AROUND)
    HookRegistry.register(TARGETS[4], add_one_req, HookType.AROUND)

