"""Block positions at the round's block size. `ForwardBatch.init_new` lays out a DLLM_EXTEND
batch's positions (and prompt mask) as `dllm_config.block_size` slots per request; a LinearSpec
round under `block_size: auto` may place fewer: the round's plan (round_plan.py,
`req.nemodiff_plan`, the same for every request of the round) says how many. The batch is
built with a copy of the config that carries them.

A quadratic round's tokens are not consecutive: d_i at +i, group i's masks at +i+1..+i+g
(quadratic_layout.py): its positions are laid out from the plan's layout. (The algorithm hands
the same layout to the model, which passes it to the attention paths: model.py.)"""

from __future__ import annotations

import copy

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",)


def init_new(original, cls, batch, model_runner, *args, **kwargs):
    config = getattr(batch, "dllm_config", None)
    if (config is None or not is_nemodiff_algorithm(config.algorithm)
            or not batch.forward_mode.is_dllm_extend() or not batch.reqs):
        return original(cls, batch, model_runner, *args, **kwargs)
    plan = batch.reqs[0].nemodiff_plan
    assert all(r.nemodiff_plan == plan for r in batch.reqs), "the requests of one round share its plan"
    block_size = plan.slots
    if block_size == config.block_size and plan.layout is None:
        return original(cls, batch, model_runner, *args, **kwargs)
    batch.dllm_config = copy.copy(config)
    batch.dllm_config.block_size = block_size
    try:
        forward_batch = original(cls, batch, model_runner, *args, **kwargs)
    finally:
        batch.dllm_config = config
    layout = plan.layout
    if layout is not None:
        offsets, _, _ = layout.tensors(forward_batch.positions.device)
        seeds = forward_batch.positions.view(-1, block_size)[:, :1]  # d_0's position per request
        forward_batch.positions = (seeds + offsets.to(seeds.dtype)).reshape(-1)
    return forward_batch


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_new, HookType.AROUND)
