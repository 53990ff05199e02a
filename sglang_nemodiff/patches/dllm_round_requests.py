"""Give the NLD algorithm the requests of the batch it runs.

SGLang calls a dLLM algorithm with the ForwardBatch only; per-request sampling parameters,
output history (penalties) and seeds live on the ScheduleBatch's requests. The TP worker has both
in `_forward_batch_generation_dllm`; hand the request list to the algorithm for that run (every
tensor-parallel rank has its own scheduler and request objects, so each rank sees the same)."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.managers.tp_worker.TpModelWorker._forward_batch_generation_dllm",)


def forward_batch_generation_dllm(original, worker, forward_batch, batch=None):
    algorithm = worker.dllm_algorithm
    if hasattr(algorithm, "round_reqs"):
        algorithm.round_reqs = list(batch.reqs) if batch is not None else None
    try:
        return original(worker, forward_batch, batch)
    finally:
        if hasattr(algorithm, "round_reqs"):
            algorithm.round_reqs = None


def apply() -> None:
    HookRegistry.register(TARGETS[0], forward_batch_generation_dllm, HookType.AROUND)
