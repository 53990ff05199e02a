"""Commit NLD results in the scheduler.

- A causal prefill batch (EXTEND) yields the first seed: stock SGLang discards context-pass
  tokens, NLD emits the token after the prompt, as AR decoding would.
- A block round (DLLM_EXTEND) emits its tokens through the stock path.
Each request's `RoundResult` (stats.py) is stored once on the request (`req.nemodiff_round`, read
by the KV stash) and folded into its stats (meta_info) and the scheduler's interval stats (log)."""

from __future__ import annotations

import dataclasses

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.algorithms import mode_of
from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm
from sglang_nemodiff.stats import IntervalStats, RequestStats

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm",)


def interval_stats(scheduler) -> IntervalStats:
    if not hasattr(scheduler, "nemodiff_interval_stats"):
        scheduler.nemodiff_interval_stats = IntervalStats()
    return scheduler.nemodiff_interval_stats


def process_batch_result_dllm(original, scheduler, batch, result):
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return original(scheduler, batch, result)
    rounds = result.dllm_algo_state or [None] * batch.batch_size()
    is_block = batch.forward_mode.is_dllm_extend()
    live = []
    for req, round_result in zip(batch.reqs, rounds):
        if req.finished() or round_result is None:
            continue
        if not hasattr(req, "nemodiff_stats"):
            req.nemodiff_stats = RequestStats(mode_of(scheduler.dllm_config.algorithm))
        req.nemodiff_round = round_result
        req.nemodiff_stats.add(round_result)  # before the stock path may finish and publish it
        live.append(req)
    original(scheduler, batch, result)  # for a prefill batch: reports prefill stats only
    emitted = set(map(id, live)) if is_block else _emit_seeds(scheduler, batch, result)
    stats = interval_stats(scheduler)
    for req in live:
        round_result = req.nemodiff_round
        if id(req) not in emitted:  # a middle prefill chunk or a re-encode: no token
            round_result = dataclasses.replace(round_result, tokens=0)
        stats.observe(round_result)
    stats.maybe_log()


def _emit_seeds(scheduler, batch, result) -> set:
    """Emit each request's first token once its whole prompt is encoded; ids of those requests."""
    emitted = set()
    if not result.next_token_ids:
        return emitted
    allocator = scheduler.token_to_kv_pool_allocator
    allocator.free_group_begin()
    for req, seed in zip(batch.reqs, result.next_token_ids):
        # Only once the whole prompt is encoded (not after a middle chunk or a re-encode).
        if req.finished() or req.output_ids or req.extend_end < req.dllm_block_offset:
            continue
        req.output_ids.append(int(seed))
        emitted.add(id(req))
        scheduler.metrics_reporter.num_generated_tokens += 1
        req.update_finish_state(new_accepted_len=1)
        scheduler._finish_dllm_request_if_needed(req)
    scheduler.output_streamer.stream_output(batch.reqs, batch.return_logprob)
    allocator.free_group_end()
    return emitted


def apply() -> None:
    HookRegistry.register(TARGETS[0], process_batch_result_dllm, HookType.AROUND)
