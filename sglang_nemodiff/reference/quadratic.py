"""Quadratic self-speculation (reference, batch 1; greedy, or sampled with AR's distribution): one forward per round verifies the
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
emitted token is a causal argmax: the output is AR's. Sampled (temperature > 0): d_k is kept with
probability p(d_k) under AR's distribution p after d_{k-1} (the drafts are argmax: a point-mass
draft distribution), else the slot draws from p without d_k; with every draft kept the bonus draws
from p. So each emitted token has AR's distribution given the tokens before it.

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

from sglang_nemodiff.reference.generate import GenerationResult, _finish, non_mask_argmax_and_prob
from sglang_nemodiff.reference.model import KVCache, NLDReference
from sglang_nemodiff.quadratic_layout import QuadraticLayout, first_draft_row, group_size  # noqa: F401


def _prefill_logits(model: NLDReference, prompt: list[int]):
    """(KV cache of the prompt, the logits of the token after it)."""
    cache = KVCache()
    logits, kv = model(torch.tensor(prompt, device=model.diffusion_head.weight.device), cache, causal=True)
    cache.append(kv)
    return cache, logits[-1]


def quadratic_layout(block_len: int, group: int, device=None, groups=None):
    """Position offsets [T], the attention pattern among the new tokens [T, T] and the
    draft-adapter rows [T] of a round (quadratic_layout.py, shared with the served mode)."""
    return QuadraticLayout(block_len, group, groups).tensors(device)


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> the distribution AR samples from: softmax(logits / temperature), cut to
    the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens more likely than each
    sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


class _Sampler:
    """Temperature 0: the argmax. Otherwise AR's distribution, and the speculative-sampling rule
    for an argmax (point-mass) draft d under AR's distribution p: accept with probability p(d),
    else draw from p with d removed (renormalised). The emitted token then has distribution p."""

    def __init__(self, temperature: float, top_p: float, generator):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def draw(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        p = filtered_probs(logits, self.temperature, self.top_p)
        return int(torch.multinomial(p, 1, generator=self.generator))

    def accepts(self, logits: torch.Tensor, draft: int) -> tuple[bool, int]:
        """(accepted, the token emitted at this slot)."""
        if self.temperature == 0:
            token = int(logits.argmax())
            return token == draft, token
        p = filtered_probs(logits, self.temperature, self.top_p)
        u = float(torch.rand((), generator=self.generator))
        if u < float(p[draft]):
            return True, draft
        residual = p.clone()
        residual[draft] = 0.0
        return False, int(torch.multinomial(residual / residual.sum(), 1, generator=self.generator))


def quadratic_generate(model: NLDReference, prompt: list[int], max_new_tokens: int,
                       eos_id: int | None = None, block_size: int = 16,
                       use_draft_lora: bool = True, groups: int | None = None,
                       temperature: float = 0.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> GenerationResult:
    """`groups`: sparse quadratic, groups after the first `groups` block tokens only.
    `temperature` > 0 (with `top_p`): sampled, with AR's distribution (`_Sampler`; drafts stay
    the groups' argmax); `generator` makes it reproducible."""
    c = model.config
    mask_id, shape = c.mask_token_id, QuadraticLayout.for_checkpoint(block_size, c.shift_logits, groups)
    device = model.diffusion_head.weight.device
    sampler = _Sampler(temperature, top_p, generator)
    cache, prefill_logits = _prefill_logits(model, prompt)
    seed = sampler.draw(prefill_logits)
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
        # Row i's logits are AR's after d_i: d_n is kept while AR (or the sampling rule) does.
        n, bonus = 1, None
        while n < L:
            ok, token = sampler.accepts(logits[n - 1], block[n])
            if not ok:
                bonus = token
                break
            n += 1
        if bonus is None:  # every draft kept: the bonus comes from AR after the last
            bonus = sampler.draw(logits[n - 1])
        accepted.append(n - 1)
        cache.append(kv, n)  # d_0..d_{n-1}: the block rows come first
        tokens += block[1:n] + [bonus]
        if n > layout.n_groups:  # a sparse round drafted no group n-1: the next has no drafts
            block = [bonus]
            continue
        g = shape.group
        group = logits[L + (n - 1) * g: L + n * g]
        drafts = non_mask_argmax_and_prob(group[layout.first_draft:], mask_id)[0].tolist()
        block = [bonus] + drafts[: block_size - 1]
