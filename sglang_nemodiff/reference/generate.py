"""Reference generation modes (AR, FastDiffuser, LinearSpec), greedy (temperature 0), batch 1.

Every forward is counted, prefill and FastDiffuser's refresh included: tokens per forward (TPF) is
`len(tokens) / forwards`. Outputs stop after the first EOS (kept) or at `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglang_nemodiff.reference.model import KVCache, NLDReference


@dataclass
class GenerationResult:
    tokens: list[int]
    forwards: int
    accept_lengths: list[int] = field(default_factory=list)  # LinearSpec: accepted drafts per block

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forwards, 1)


def non_mask_argmax_and_prob(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the last dim of logits of any shape [..., V]: the argmax with the mask id excluded, and
    that token's softmax probability with the mask id kept in the denominator (the loop-free torch
    counterpart of `kernels.confidence_argmax`, which takes [N, V] only)."""
    probs = logits.float().softmax(-1)
    tokens = logits.float().clone()
    tokens[..., mask_id] = float("-inf")
    tokens = tokens.argmax(-1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def _finish(tokens: list[int], eos_id: int | None, max_new_tokens: int) -> tuple[list[int], bool]:
    """Trim after the first EOS (kept) and at max_new_tokens; report whether generation is over."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1][:max_new_tokens], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


def _prefill(model: NLDReference, prompt: list[int]) -> tuple[KVCache, int]:
    cache = KVCache()
    ids = torch.tensor(prompt, device=model.diffusion_head.weight.device)
    logits, kv = model(ids, cache, causal=True)
    cache.append(kv)
    return cache, int(logits[-1].argmax())


def ar_generate(model: NLDReference, prompt: list[int], max_new_tokens: int,
                eos_id: int | None = None) -> GenerationResult:
    cache, token = _prefill(model, prompt)
    tokens, forwards = [token], 1
    device = model.diffusion_head.weight.device
    while True:
        tokens, done = _finish(tokens, eos_id, max_new_tokens)
        if done:
            return GenerationResult(tokens, forwards)
        logits, kv = model(torch.tensor([tokens[-1]], device=device), cache, causal=True)
        cache.append(kv)
        forwards += 1
        tokens.append(int(logits[-1].argmax()))


def fastdiffuser_generate(model: NLDReference, prompt: list[int], max_new_tokens: int,
                          eos_id: int | None = None, block_size: int = 32,
                          threshold: float = 0.9, use_draft_lora: bool = False) -> GenerationResult:
    """FastDiffuser; `use_draft_lora` runs the denoise passes with the draft adapter (the
    server's `denoise_lora` setting), never the causal refresh pass."""
    mask_id = model.config.mask_token_id
    cache, seed = _prefill(model, prompt)
    tokens, forwards = [seed], 1
    device = model.diffusion_head.weight.device
    while True:
        tokens, done = _finish(tokens, eos_id, max_new_tokens)
        if done:
            return GenerationResult(tokens, forwards)
        block = torch.full((block_size,), mask_id, device=device)
        block[0] = tokens[-1]
        masked = torch.ones(block_size, dtype=torch.bool, device=device)
        masked[0] = False
        while masked.any():
            logits, _ = model(block, cache, causal=False, use_draft_lora=use_draft_lora)
            forwards += 1
            x0, confidence = non_mask_argmax_and_prob(logits, mask_id)
            commit = masked & (confidence >= threshold)
            commit[torch.where(masked, confidence, -1.0).argmax()] = True  # the most confident, always
            block = torch.where(commit, x0, block)
            masked &= ~commit
            if eos_id is not None:
                # EOS freeze: a generated EOS with no mask to its left ends the block.
                eos_pos = ((block == eos_id) & ~masked).nonzero()
                eos_pos = eos_pos[eos_pos > 0]
                if len(eos_pos) and not masked[: int(eos_pos[0])].any():
                    block[int(eos_pos[0]):] = eos_id
                    masked[:] = False
        # Refresh: one causal pass writes the finished block's KV and yields the next seed.
        logits, kv = model(block, cache, causal=True)
        forwards += 1
        cache.append(kv)
        tokens += block[1:].tolist() + [int(logits[-1].argmax())]


def linearspec_generate(model: NLDReference, prompt: list[int], max_new_tokens: int,
                        eos_id: int | None = None, block_size: int = 32,
                        use_draft_lora: bool = True) -> GenerationResult:
    mask_id = model.config.mask_token_id
    cache, seed = _prefill(model, prompt)
    tokens, forwards, accepted = [seed], 1, []
    device = model.diffusion_head.weight.device
    while True:
        tokens, done = _finish(tokens, eos_id, max_new_tokens)
        if done:
            return GenerationResult(tokens, forwards, accepted)
        block = torch.full((block_size,), mask_id, device=device)
        block[0] = tokens[-1]
        draft_logits, _ = model(block, cache, causal=False, use_draft_lora=use_draft_lora)
        block[1:] = non_mask_argmax_and_prob(draft_logits, mask_id)[0][1:]
        verify_logits, kv = model(block, cache, causal=True)  # base weights: lossless
        forwards += 2
        ar = verify_logits.argmax(-1)
        matches = (block[1:] == ar[:-1]).int()
        c = int(matches.cumprod(0).sum())
        cache.append(kv, c + 1)  # seed + accepted drafts; the bonus is the next seed
        accepted.append(c)
        tokens += block[1 : c + 1].tolist() + [int(ar[c])]
