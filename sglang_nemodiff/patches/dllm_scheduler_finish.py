"""Publish a request's NLD stats the moment it finishes, before its last output is streamed, and
count it once in the plugin's Prometheus metrics (metrics.py)."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.metrics import scheduler_metrics
from sglang_nemodiff.stats import publish_stats

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._finish_dllm_request_if_needed",)


def finish_dllm_request_if_needed(original, scheduler, req):
    original(scheduler, req)
    if req.finished() and hasattr(req, "nemodiff_stats"):
        tokens = publish_stats(req)
        metrics = scheduler_metrics(scheduler, req.nemodiff_stats.mode)
        if metrics is not None and not getattr(req, "nemodiff_counted", False):
            req.nemodiff_counted = True
            metrics.observe_finished(req.nemodiff_stats, tokens)


def apply() -> None:
    HookRegistry.register(TARGETS[0], finish_dllm_request_if_needed, HookType.AROUND)
