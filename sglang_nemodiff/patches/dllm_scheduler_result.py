"""Commit NLD results in the scheduler.

- A causal prefill batch (EXTEND) yields the first token: stock SGLang discards context-pass
  tokens, NLD emits the token after the prompt, as AR decoding would, with its logprobs (and the
  prompt's input logprobs) through SGLang's own prefill logprob path. A request with
  max_new_tokens=0 (prompt scoring, `sgl.select`) finishes here with its input logprobs.
- A block round (DLLM_EXTEND) emits its tokens through the stock path; their logprobs (computed
  by the algorithm, `RoundResult.logprobs`) are appended first, so they stream with the tokens.
Each request's `RoundResult` (stats.py) is stored once on the request (`req.nemodiff_round`, read
by the KV stash) and folded into its stats (meta_info), the scheduler's interval stats (log) and,
with --enable-metrics, the plugin's Prometheus metrics (metrics.py). The round's record, if its
plan was timed, goes to the scheduler's block policy once (block_policy.py: RoundBlockSize.observe)."""

from __future__ import annotations

import dataclasses

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.algorithms import emits_first_token, mode_of
from sglang_nemodiff.metrics import scheduler_metrics
from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm
from sglang_nemodiff.stats import IntervalStats, RequestStats, TokenLogprobs

_PROCESSOR = ("sglang.srt.managers.scheduler_components.batch_result_processor."
              "SchedulerBatchResultProcessor")
TARGETS = (
    "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm",
    # SGLang's own prefill logprob helpers, reused for the first token and the prompt.
    _PROCESSOR + ".move_logprobs_to_cpu",
    _PROCESSOR + "._apply_prefill_logprobs",
    _PROCESSOR + "._apply_chunked_prefill_logprobs",
)


def interval_stats(scheduler) -> IntervalStats:
    if not hasattr(scheduler, "nemodiff_interval_stats"):
        scheduler.nemodiff_interval_stats = IntervalStats()
    return scheduler.nemodiff_interval_stats


def _append_output_logprobs(req, logprobs: TokenLogprobs, tokens) -> None:
    lp = req.logprob
    lp.output_token_logprobs_val.extend(logprobs.token_logprobs)
    lp.output_token_logprobs_idx.extend(tokens)
    if lp.top_logprobs_num > 0:
        for values, ids in logprobs.top_logprobs or [([], [])] * len(tokens):
            lp.output_top_logprobs_val.append(values)
            lp.output_top_logprobs_idx.append(ids)
    if lp.token_ids_logprob is not None:
        for values in logprobs.ids_logprobs or [[]] * len(tokens):
            lp.output_token_ids_logprobs_val.append(values)
            lp.output_token_ids_logprobs_idx.append(lp.token_ids_logprob)


def process_batch_result_dllm(original, scheduler, batch, result):
    if not is_nemodiff_algorithm(scheduler.dllm_config.algorithm):
        return original(scheduler, batch, result)
    rounds = result.dllm_algo_state or [None] * batch.batch_size()
    is_block = batch.forward_mode.is_dllm_extend()
    planner = getattr(scheduler.dllm_manager, "nemodiff_rounds", None)  # block_policy.round_planner
    if planner is not None:
        records = {id(r.record): r.record for r in rounds if r is not None and r.record is not None}
        for record in records.values():
            planner.observe(record)
    live = []
    metrics = scheduler_metrics(scheduler, mode_of(scheduler.dllm_config.algorithm))
    for i, (req, round_result) in enumerate(zip(batch.reqs, rounds)):
        if req.finished() or round_result is None:
            continue
        if not hasattr(req, "nemodiff_stats"):
            req.nemodiff_stats = RequestStats(mode_of(scheduler.dllm_config.algorithm))
        req.nemodiff_round = round_result
        req.nemodiff_stats.add(round_result)  # before the stock path may finish and publish it
        if metrics is not None:
            metrics.observe_round(round_result)
        if is_block and req.return_logprob and round_result.logprobs is not None:
            _append_output_logprobs(req, round_result.logprobs, result.next_token_ids[i].tolist())
        live.append(req)
    original(scheduler, batch, result)  # for a prefill batch: reports prefill stats only
    emitted = set(map(id, live)) if is_block else _emit_first_tokens(scheduler, batch, result)
    stats = interval_stats(scheduler)
    for req in live:
        round_result = req.nemodiff_round
        if id(req) not in emitted:  # a middle prefill chunk or a re-encode: no token
            round_result = dataclasses.replace(round_result, tokens=0)
        stats.observe(round_result)
    stats.maybe_log(planner.last_choice if planner is not None else None)


def _emit_first_tokens(scheduler, batch, result) -> set:
    """Emit each request's first token once its whole prompt is encoded, with logprobs as
    SGLang's prefill path computes them; returns the ids of the requests that emitted."""
    emitted = set()
    if not result.next_token_ids:
        return emitted
    logits_output = result.logits_output
    processor = scheduler.batch_result_processor
    if batch.return_logprob:
        processor.move_logprobs_to_cpu(batch=batch, logits_output=logits_output)
    allocator = scheduler.token_to_kv_pool_allocator
    allocator.free_group_begin()
    logprob_pt = 0
    for i, (req, token) in enumerate(zip(batch.reqs, result.next_token_ids)):
        if req.finished() or req.is_retracted:
            continue
        if not emits_first_token(req):
            if batch.return_logprob and not req.output_ids:
                logprob_pt = processor._apply_chunked_prefill_logprobs(
                    req=req, i=i, logits_output=logits_output,
                    extend_input_len_per_req=result.extend_input_len_per_req,
                    extend_logprob_start_len_per_req=result.extend_logprob_start_len_per_req,
                    logprob_pt=logprob_pt)
            continue
        req.output_ids.append(int(token))
        emitted.add(id(req))
        scheduler.metrics_reporter.num_generated_tokens += 1
        if batch.return_logprob:
            logprob_pt = processor._apply_prefill_logprobs(
                req=req, i=i, logits_output=logits_output,
                extend_input_len_per_req=result.extend_input_len_per_req,
                extend_logprob_start_len_per_req=result.extend_logprob_start_len_per_req,
                next_token_ids=result.next_token_ids, logprob_pt=logprob_pt)
        req.update_finish_state(new_accepted_len=1)
        scheduler._finish_dllm_request_if_needed(req)
    scheduler.output_streamer.stream_output(batch.reqs, batch.return_logprob)
    allocator.free_group_end()
    return emitted


def apply() -> None:
    HookRegistry.register(TARGETS[0], process_batch_result_dllm, HookType.AROUND)
