"""Commit NLD results in the scheduler.

- A causal prefill batch (EXTEND) yields the first seed: stock SGLang discards context-pass
  tokens, NLD emits the argmax of the prompt's last position, as AR decoding would.
- A block round (DLLM_EXTEND) emits its tokens through the stock path; we record per-request
  stats (forwards, kept slots, accepted drafts) for meta_info and the server log."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm
from sglang_nemodiff.stats import RequestStats, log_interval_stats

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm",)


def process_batch_result_dllm(original, scheduler, batch, result):
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return original(scheduler, batch, result)
    algorithm = scheduler.dllm_config.algorithm
    round_stats = result.dllm_algo_state or [None] * batch.batch_size()
    for req, stats in zip(batch.reqs, round_stats):
        if req.finished():
            continue
        if not hasattr(req, "nemodiff_stats"):
            req.nemodiff_stats = RequestStats(algorithm)
        if stats is not None:
            req.nemodiff_stats.add_round(stats, is_block=batch.forward_mode.is_dllm_extend())
            req.nemodiff_keep = stats.get("keep")
    original(scheduler, batch, result)  # for a prefill batch: reports prefill stats only
    if not batch.forward_mode.is_dllm_extend():
        _emit_seeds(scheduler, batch, result)
    log_interval_stats(batch, round_stats)


def _emit_seeds(scheduler, batch, result):
    if not result.next_token_ids:
        return
    allocator = scheduler.token_to_kv_pool_allocator
    allocator.free_group_begin()
    for req, seed in zip(batch.reqs, result.next_token_ids):
        # Only once the whole prompt is encoded (not after a middle chunk or a re-encode).
        if req.finished() or req.output_ids or req.extend_end < req.dllm_block_offset:
            continue
        req.output_ids.append(int(seed))
        scheduler.metrics_reporter.num_generated_tokens += 1
        req.update_finish_state(new_accepted_len=1)
        scheduler._finish_dllm_request_if_needed(req)
    scheduler.output_streamer.stream_output(batch.reqs, batch.return_logprob)
    allocator.free_group_end()


def apply() -> None:
    HookRegistry.register(TARGETS[0], process_batch_result_dllm, HookType.AROUND)
