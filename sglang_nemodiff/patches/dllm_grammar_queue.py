"""Move requests whose grammar has compiled into the waiting queue in dLLM mode too.

SGLang parks a request with regex/JSON/EBNF constraints in the grammar manager's queue until its
grammar compiles; only the AR prefill scheduler (`_get_new_batch_prefill_raw`) moves ready ones
to the waiting queue, so in dLLM mode such a request would wait forever. Do the same step at the
start of every dLLM scheduling round."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.get_new_batch_dllm",
           "sglang.srt.constrained.grammar_manager.GrammarManager.has_waiting_grammars",
           "sglang.srt.constrained.grammar_manager.GrammarManager.get_ready_grammar_requests")


def get_new_batch_dllm(original, scheduler, running_batch):
    manager = scheduler.grammar_manager
    if is_nemodiff_algorithm(scheduler.dllm_config.algorithm) and manager.has_waiting_grammars():
        for req in manager.get_ready_grammar_requests():
            scheduler._add_request_to_queue(req)
    return original(scheduler, running_batch)


def apply() -> None:
    HookRegistry.register(TARGETS[0], get_new_batch_dllm, HookType.AROUND)
