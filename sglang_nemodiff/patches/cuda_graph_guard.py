"""Before SGLang replays a CUDA graph for an NLD model (model.py):
- an eager model's graph froze the pass kind taken at capture: replaying it for another kind is
  refused (GraphPassGuard raises);
- a graph-safe model's graph serves every kind (its kind is data, pass_kind.py) but only the
  round width it was captured for: SGLang's dLLM runner captures `block_size` tokens per request
  and does not check a batch's width (rounds of another block size, a quadratic round's
  b(b + 1) tokens, AR steps), so those run eagerly."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner."
           "can_run_graph",)


def can_run_graph(original, runner, forward_batch):
    can_run = original(runner, forward_batch)
    model = getattr(getattr(runner, "model_runner", None), "model", None)
    guard = getattr(model, "graph_guard", None)
    if not can_run or guard is None:
        return can_run
    if model.pass_options.graph_safe:
        width = getattr(runner, "captured_req_width", None)
        return width is None or forward_batch.input_ids.numel() == forward_batch.batch_size * width
    guard.check(forward_batch.forward_mode, model.pass_options.resolve(forward_batch).name)
    return can_run


def apply() -> None:
    HookRegistry.register(TARGETS[0], can_run_graph, HookType.AROUND)
