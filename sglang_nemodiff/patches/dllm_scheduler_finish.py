"""Publish a request's NLD stats the moment it finishes, before its last output is streamed."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.stats import publish_stats

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._finish_dllm_request_if_needed",)


def finish_dllm_request_if_needed(original, scheduler, req):
    original(scheduler, req)
    if req.finished() and hasattr(req, "nemodiff_stats"):
        publish_stats(req)


def apply() -> None:
    HookRegistry.register(TARGETS[0], finish_dllm_request_if_needed, HookType.AROUND)
