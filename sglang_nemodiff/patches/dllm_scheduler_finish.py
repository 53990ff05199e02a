"""Publish a request's NLD stats the moment it finishes, before its last output is streamed, and
count it once in the plugin's Prometheus metrics (metrics.py).

Stock SGLang finishes a request (length) once its next block would pass the context length; a
quadratic round places more than a block (patches/dllm_config.py: round_slots), so the check
uses what the next round places."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.metrics import scheduler_metrics
from sglang_nemodiff.patches.dllm_config import round_slots
from sglang_nemodiff.stats import publish_stats

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._finish_dllm_request_if_needed",
           "sglang.srt.managers.schedule_batch.FINISH_LENGTH")


def finish_dllm_request_if_needed(original, scheduler, req):
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    slots = round_slots(scheduler.dllm_config)
    if (slots > scheduler.dllm_config.block_size and not req.finished()
            and req.seqlen + slots > scheduler.model_config.context_len):
        req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
    original(scheduler, req)
    if req.finished() and hasattr(req, "nemodiff_stats"):
        tokens = publish_stats(req)
        metrics = scheduler_metrics(scheduler, req.nemodiff_stats.mode)
        if metrics is not None and not getattr(req, "nemodiff_counted", False):
            req.nemodiff_counted = True
            metrics.observe_finished(req.nemodiff_stats, tokens)


def apply() -> None:
    HookRegistry.register(TARGETS[0], finish_dllm_request_if_needed, HookType.AROUND)
