"""Place an NLD block at the seed, at the round's block size. SGLang's separate-context dLLM path
appends the block after all committed tokens; NLD's block is `[seed, MASK × (B-1)]` where the seed
is the last committed token and is not yet in the KV cache (see algorithms/base.py).

Every request of a decode round gets the same plan (round_plan.py: B, the slots placed, whether
AR steps), decided once per scheduling step by the scheduler's planner (block_policy.py) when the
first block of the step is placed, and carried on the request (`req.nemodiff_plan`). A B = 1
round places `ar_steps` slots: the algorithm fills them with AR steps. A step starts in
`DllmManager.init_next_round`, which places the next block of every request that just ran.
A quadratic round places `[seed, drafts, group masks]` (quadratic_layout.py), its drafts those
the request's last round made (`RoundResult.next_drafts`).
A request waiting with a block placed in an earlier step (a prefill round ran in between, or
the pool had no room) keeps its block and plan, and the step takes that plan.

A request takes from the radix cache at most the whole blocks before its seed
(`dllm_block_offset`), so its prefill always has a token to encode. Stock SGLang's
limit (input length - 1) ensures that only while the fill ids end at the seed: a prompt's first
prefill (unchanged here), not a request with outputs re-encoded after retraction, whose block's
masks follow the seed. With its seed block-aligned (FastDiffuser's always are) and everything
before it still cached, it would match up to the seed and be staged as a decode inside a prefill
batch, which runs no block round for it (the KV stash then fails). Rare (the retraction usually
evicts its last page), the cost of the limit is one block re-encoded."""

from __future__ import annotations

from array import array

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = (
    "sglang.srt.dllm.mixin.req.ReqDllmMixin._init_fill_ids_for_dllm",
    "sglang.srt.dllm.mixin.scheduler.DllmManager.init_next_round",
    "sglang.srt.dllm.mixin.req.DllmReqPhase",
    "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len",
)


class _Step:
    manager = None  # the DllmManager of this process (one scheduler per process)
    plan = None  # the current scheduling step's RoundPlan (decided once per step)
    replacing = frozenset()  # ids of the requests whose block this step re-places


def _decide(dllm_config):
    """The RoundPlan of the current scheduling step."""
    from sglang.srt.dllm.mixin.req import DllmReqPhase

    from sglang_nemodiff.block_policy import round_planner

    manager = _Step.manager
    planner = round_planner(manager, dllm_config)
    queued = [r for r in (manager.waiting_queue if manager is not None else []) if not r.finished()]
    staged = [r for r in queued
              if r.dllm_phase == DllmReqPhase.STAGING_DECODE and id(r) not in _Step.replacing
              and r.dllm_initialized and len(r.full_untruncated_fill_ids) > r.dllm_block_offset]
    if staged:
        # Blocks placed in an earlier step were placed together, with one plan.
        return staged[0].nemodiff_plan
    # The decode batch this step forms: every queued request that has its first token.
    decoding = [r for r in queued if r.output_ids][:dllm_config.max_running_requests]
    batch = max(len(decoding), 1)
    choice = planner.begin_round(batch, [_budget(r) for r in decoding], [r.rid for r in decoding])
    return planner.plan(*_broadcast(choice.block_size, choice.groups), batch_size=batch)


def _budget(req) -> int:
    """Tokens the request may still generate (its max_new_tokens less those it has)."""
    limit = req.sampling_params.max_new_tokens
    return (1 << 30) if limit is None else max(1, limit - len(req.output_ids))


def _broadcast(block_size: int, groups):
    """Tensor-parallel ranks must run the same round shape: rank 0's choice wins.
    Returns (block size, groups or None)."""
    try:
        from sglang.srt.distributed import get_tp_group

        group = get_tp_group()
    except Exception:  # no model-parallel group in this process
        return block_size, groups
    if group.world_size <= 1:
        return block_size, groups
    import torch
    import torch.distributed as dist

    value = torch.tensor([block_size, groups or 0], dtype=torch.int64)
    dist.broadcast(value, src=group.ranks[0], group=group.cpu_group)
    return int(value[0]), (int(value[1]) or None)


def init_fill_ids_for_dllm(original, req):
    if not is_nemodiff_algorithm(req.dllm_config.algorithm) or not req.output_ids:
        # No seed yet: the (chunked) causal prefill of the prompt runs as in stock SGLang.
        return original(req)
    if _Step.plan is None:
        _Step.plan = _decide(req.dllm_config)
    committed = req.origin_input_ids + req.output_ids
    req.dllm_block_offset = len(committed) - 1
    mask_id, plan = req.dllm_config.mask_id, _Step.plan
    if plan.layout is not None:
        # A quadratic round: [seed, the drafts the last round made, masks]; mask ids stand for
        # drafts not made (the first round, after a re-encode), and are never right but by AR.
        drafts = list(getattr(getattr(req, "nemodiff_round", None), "next_drafts", None) or ())
        drafts = (drafts + [mask_id] * plan.block_size)[:plan.block_size - 1]
        block = array("q", drafts + [mask_id] * (plan.slots - plan.block_size))
    else:
        block = array("q", [mask_id] * (plan.slots - 1))
    req.full_untruncated_fill_ids = committed + block
    req.nemodiff_plan = _Step.plan  # read by the positions patch, the algorithm and the stash
    req.dllm_initialized = True


def init_next_round(original, manager):
    _Step.manager = manager
    _Step.plan = None
    _Step.replacing = frozenset(map(id, manager.staging_queue))
    original(manager)


def compute_max_prefix_len(original, req, input_len):
    """The prefix a request may take from the radix cache: below its seed's block (see above)."""
    limit = original(req, input_len)
    dllm_config = req.dllm_config
    if dllm_config is None or not is_nemodiff_algorithm(dllm_config.algorithm):
        return limit
    block_size = dllm_config.block_size
    return max(0, min(limit, (req.dllm_block_offset - 1) // block_size * block_size))


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_fill_ids_for_dllm, HookType.AROUND)
    HookRegistry.register(TARGETS[1], init_next_round, HookType.AROUND)
    HookRegistry.register(TARGETS[3], compute_max_prefix_len, HookType.AROUND)
