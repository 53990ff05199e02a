"""Check an NLD model's pass kind before SGLang replays a CUDA graph (see model.GraphPassGuard):
a graph captured for one pass kind must never be replayed for another (an eager model's; a
graph-safe model reads its kind as data and needs no check)."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner."
           "can_run_graph",)


def can_run_graph(original, runner, forward_batch):
    can_run = original(runner, forward_batch)
    model = getattr(getattr(runner, "model_runner", None), "model", None)
    guard = getattr(model, "graph_guard", None)
    if can_run and guard is not None and not model.pass_options.graph_safe:
        guard.check(forward_batch.forward_mode, model.pass_options.resolve(forward_batch).name)
    return can_run


def apply() -> None:
    HookRegistry.register(TARGETS[0], can_run_graph, HookType.AROUND)
