"""Per-request stats in meta_info: `req.customized_info` values for keys that are request-level
(sent once, when the request finishes) reach the response's meta_info unchanged."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.stats import META_KEYS

TARGETS = ("sglang.srt.managers.scheduler_components.output_streamer."
           "SchedulerOutputStreamer.is_request_level_customized_info_key",)


def is_request_level_customized_info_key(original, streamer, key):
    return key in META_KEYS or original(streamer, key)


def apply() -> None:
    HookRegistry.register(TARGETS[0], is_request_level_customized_info_key, HookType.AROUND)
