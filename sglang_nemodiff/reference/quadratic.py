"""Quadratic self-speculation (reference, greedy, batch 1): one forward per round verifies the
current block and drafts the next block for every possible acceptance length.

A round holds a block d_0..d_{L-1} (d_0: the previous round's bonus, i.e. AR's own token, not yet
in the KV cache; d_1..: drafts) and, after each d_i, a group of g mask tokens:
- d_i at position ctx + i attends causally to d_0..d_i with the base weights: its logits are AR's
  prediction for position ctx + i + 1;
- group i's masks at ctx + i + 1 .. ctx + i + g attend to d_0..d_i and to their own group, with
  the draft adapter: the draft of the next block if exactly d_0..d_i are accepted.
Verify: d_k is accepted while AR's prediction after d_{k-1} equals it; n = accepted + 1. The KV of
d_0..d_{n-1} is kept. Emitted: d_1..d_{n-1} and the bonus (AR's prediction after d_{n-1}), which is
the next block's d_0; the next drafts are group n-1's predictions for the slots after it. Every
emitted token is a causal argmax: the output is AR's.

Group size: NLD checkpoints (unshifted drafts) predict each mask's own position, so a group holds
b masks (the first at the bonus's position, which the bonus replaces): b(b+1) query tokens for a
b-token block. Converted AR models (`shift_logits`) predict the position after each row, so d_i's
own causal row already predicts the bonus and a group holds b - 1 masks: b * b query tokens.
The first round has no drafts: the block is d_0 alone (one group: a LinearSpec draft pass that
also writes d_0's KV).
"""

from __future__ import annotations

import dataclasses

import torch

from sglang_nemodiff.reference.generate import GenerationResult, _finish, _prefill, non_mask_argmax_and_prob
from sglang_nemodiff.reference.model import NLDReference
from sglang_nemodiff.quadratic_layout import QuadraticLayout, first_draft_row, group_size  # noqa: F401


def quadratic_layout(block_len: int, group: int, device=None, groups=None):
    """Position offsets [T], the attention pattern among the new tokens [T, T] and the
    draft-adapter rows [T] of a round (quadratic_layout.py, shared with the served mode)."""
    return QuadraticLayout(block_len, group, groups).tensors(device)


def quadratic_generate(model: NLDReference, prompt: list[int], max_new_tokens: int,
                       eos_id: int | None = None, block_size: int = 16,
                       use_draft_lora: bool = True, groups: int | None = None) -> GenerationResult:
    """`groups`: sparse quadratic, groups after the first `groups` block tokens only."""
    c = model.config
    mask_id, shape = c.mask_token_id, QuadraticLayout.for_checkpoint(block_size, c.shift_logits, groups)
    device = model.diffusion_head.weight.device
    cache, seed = _prefill(model, prompt)
    tokens, forwards, accepted = [seed], 1, []
    block = [seed]
    while True:
        tokens, done = _finish(tokens, eos_id, max_new_tokens)
        if done:
            return GenerationResult(tokens, forwards, accepted)
        L, ctx = len(block), len(cache)
        layout = dataclasses.replace(shape, block_len=L)  # the first round: d_0 alone
        offsets, allowed, is_mask = layout.tensors(device)
        ids = torch.tensor(block + [mask_id] * (layout.tokens - L), device=device)
        logits, kv = model.forward_structured(ids, cache, ctx + offsets, allowed,
                                              is_mask if use_draft_lora else None)
        forwards += 1
        ar = logits[:L].argmax(-1).tolist()  # AR's prediction after each d_i
        n = 1
        while n < L and block[n] == ar[n - 1]:
            n += 1
        accepted.append(n - 1)
        cache.append(kv, n)  # d_0..d_{n-1}: the block rows come first
        bonus = ar[n - 1]
        tokens += block[1:n] + [bonus]
        if n > layout.n_groups:  # a sparse round drafted no group n-1: the next has no drafts
            block = [bonus]
            continue
        g = shape.group
        group = logits[L + (n - 1) * g: L + n * g]
        drafts = non_mask_argmax_and_prob(group[layout.first_draft:], mask_id)[0].tolist()
        block = [bonus] + drafts[: block_size - 1]
