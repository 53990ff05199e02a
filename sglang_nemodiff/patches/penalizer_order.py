"""Apply SGLang's penalizers in one fixed order, in every process.

SGLang 0.5.23 builds each batch's penalizer orchestrator from a *set* of penalizer classes and
applies them in that set's iteration order, which follows the classes' hashes (their memory
addresses): it differs from one server process to the next. Additive penalties (frequency,
presence) and the repetition penalty (which scales a logit: divides a positive one, multiplies a
negative one) do not commute, so with both in one request the same prompt could decode
differently on two AR servers (seen: a 0.018 logit margin flipped, intermittently, in the
penalties test). Sort them: additive penalties and the min-new-tokens stop mask first, the
scaling penalty last, which is also the order SGLang's own speculative path uses
(`BatchedPenalizerOrchestrator.apply(repeat=...)`) and the one LinearSpec's verify slots use
(algorithms/sampling.py). Applies in every mode, AR included."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.sampling.penaltylib.orchestrator.BatchedPenalizerOrchestrator.__init__",)

ORDER = ("BatchedFrequencyPenalizer", "BatchedPresencePenalizer", "BatchedMinNewTokensPenalizer",
         "BatchedRepetitionPenalizer")


def _rank(penalizer_class) -> tuple:
    name = penalizer_class.__name__
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def orchestrator_init(original, orchestrator, *args, **kwargs):
    original(orchestrator, *args, **kwargs)
    orchestrator.penalizers = dict(sorted(orchestrator.penalizers.items(), key=lambda kv: _rank(kv[0])))


def apply() -> None:
    HookRegistry.register(TARGETS[0], orchestrator_init, HookType.AROUND)
