"""FastDiffuser (NLD_SPEC §3): denoise a 32-token block, committing per step the most confident
masked position plus every masked position with confidence >= threshold; then one causal refresh
pass keeps the whole block's KV and yields the next seed (see base.py)."""

from __future__ import annotations

import torch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import NLDBlockAlgorithm, confidence_argmax


class NemodiffFastDiffuser(NLDBlockAlgorithm):
    mode_name = "fastdiffuser"

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(self.settings.threshold)

    def fill_block(self, model_runner, forward_batch, block):
        positions = torch.arange(self.block_size, device=block.device)
        masked = block == self.mask_id
        masked[:, 0] = False  # the seed is committed
        forwards = 0
        while bool(masked.any()):  # one host sync per step, like the stock dLLM loop
            out = self.forward_pass(model_runner, forward_batch, causal=False)
            forwards += 1
            logits = out.logits_output.full_logits.view(*block.shape, -1)
            x0, confidence = confidence_argmax(logits, self.mask_id)
            # Masked positions with confidence >= threshold, plus the most confident one.
            commit = kernels.fastdiffuser_commit(x0, confidence, masked, self.threshold)
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
        return forwards

    def accept(self, block, causal_argmax):
        keep = torch.full((block.shape[0],), self.block_size, device=block.device)
        return keep, None


Algorithm = NemodiffFastDiffuser
