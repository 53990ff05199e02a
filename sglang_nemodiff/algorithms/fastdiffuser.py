"""FastDiffuser: denoise a block, committing per step the most confident masked position plus
every masked position with confidence >= threshold; then one causal refresh pass keeps the whole
block's KV and yields the next seed (see base.py).

At temperature > 0 each step samples x0 at every masked position from the request's tempered,
top-k/top-p/min-p-filtered distribution (mask token excluded) and uses that token's probability
under it as the confidence (the NLD reference's semantics); greedy requests take the argmax and
its softmax probability. The seed after the block is sampled from the causal pass like an AR
step. FastDiffuser decodes in parallel, so unlike LinearSpec its output distribution is its own,
not AR's."""

from __future__ import annotations

import torch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import BlockFill, NLDBlockAlgorithm, masked_confidence_argmax
from sglang_nemodiff.algorithms.sampling import sample_from

SEED_STREAM = 1 << 20  # the refresh pass's draw; denoise step s uses stream s


class NemodiffFastDiffuser(NLDBlockAlgorithm):
    mode_name = "fastdiffuser"

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(self.settings.threshold)

    def _x0(self, logits, sampling, step: int):
        x0, confidence = masked_confidence_argmax(logits, self.mask_id)
        if not sampling.all_greedy:
            rows = (~sampling.greedy).nonzero().squeeze(1)
            chosen = sampling.select(rows)
            masked = logits[rows].float()
            masked[..., self.mask_id] = float("-inf")
            probs = chosen.probs(masked)
            B, V = probs.shape[1], probs.shape[2]
            u = chosen.uniforms(B, step, probs.device)
            tokens = sample_from(probs.reshape(-1, V), u.reshape(-1)).view(-1, B)
            x0[rows] = tokens
            confidence[rows] = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return x0, confidence

    def fill_block(self, model_runner, forward_batch, block, sampling):
        positions = torch.arange(self.block_size, device=block.device)
        masked = block == self.mask_id
        masked[:, 0] = False  # the seed is committed
        forwards = 0
        while bool(masked.any()):  # one host sync per step, like the stock dLLM loop
            out = self.forward_pass(model_runner, forward_batch, causal=False)
            logits = out.logits_output.full_logits.view(*block.shape, -1)
            x0, confidence = self._x0(logits, sampling, forwards)
            forwards += 1
            # Masked positions with confidence >= threshold, plus the most confident one.
            commit = kernels.fastdiffuser_commit(confidence, masked, self.threshold)
            block.copy_(torch.where(commit, x0, block))
            masked &= ~commit
            if self.eos_id is not None:
                # EOS freeze: a committed EOS with no mask to its left ends the block with EOS.
                is_eos = (block == self.eos_id) & ~masked & (positions > 0)
                first_eos = torch.where(is_eos, positions, self.block_size).min(1, keepdim=True).values
                masks_before = (masked & (positions < first_eos)).any(1, keepdim=True)
                frozen = (first_eos < self.block_size) & ~masks_before
                block.copy_(torch.where(frozen & (positions > first_eos), self.eos_id, block))
                masked &= ~frozen
        return BlockFill(forwards=forwards)

    def accept(self, block, verify, sampling, fill):
        keep = torch.full((block.shape[0],), self.block_size, device=block.device)
        bonus = self.next_tokens(verify[:, -1:], sampling, SEED_STREAM)[:, 0]
        return keep, None, bonus
