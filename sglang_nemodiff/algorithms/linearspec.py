"""LinearSpec: one bidirectional draft pass fills every mask (draft LoRA on), one causal verify
pass (base weights) decides how many drafts to keep; the token after them is the bonus and next
seed. Exactly 2 forwards per block.

Greedy requests accept the longest prefix of drafts equal to the causal argmax (lossless: every
emitted token is a causal argmax, as in AR). Requests that sample accept by speculative sampling
(kernels/speculative.py) between the draft distribution q and the verify distribution p, both
after the request's temperature/top-k/top-p/min-p (and, for p, penalties and logit bias with the
drafts before each slot counted as generated): the emitted tokens have AR's distribution."""

from __future__ import annotations

import torch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import BlockFill, NLDBlockAlgorithm, masked_confidence_argmax
from sglang_nemodiff.algorithms.sampling import sample_from

DRAFT_STREAM, ACCEPT_STREAM = 1, 2  # random streams of one round (seeded requests)


class NemodiffLinearSpec(NLDBlockAlgorithm):
    mode_name = "linearspec"
    supports_penalties = True

    def fill_block(self, model_runner, forward_batch, block, sampling):
        out = self.forward_pass(model_runner, forward_batch, causal=False, draft_lora=True)
        logits = out.logits_output.full_logits.view(*block.shape, -1)
        draft, _ = masked_confidence_argmax(logits, self.mask_id)
        fill = BlockFill(forwards=1)
        if not sampling.all_greedy:
            rows = (~sampling.greedy).nonzero().squeeze(1)
            chosen = sampling.select(rows)
            masked = logits[rows, 1:].float()
            masked[..., self.mask_id] = float("-inf")  # a draft is never the mask token
            q = chosen.probs(masked)
            if self.settings.draft_sampling == "sample":
                K, V = q.shape[1], q.shape[2]
                u = chosen.uniforms(K, DRAFT_STREAM, q.device)
                draft[rows, 1:] = sample_from(q.reshape(-1, V), u.reshape(-1)).view(-1, K)
                fill = BlockFill(forwards=1, sampled_rows=rows, draft_probs=q)
            else:  # argmax drafts: q is a point mass on each draft
                draft[rows, 1:] = q.argmax(-1)
                fill = BlockFill(forwards=1, sampled_rows=rows)
        block[:, 1:] = draft[:, 1:]
        return fill

    def accept(self, block, verify, sampling, fill):
        logits = sampling.adjust(verify, block)
        # Greedy: draft i is accepted while it equals the causal argmax of slot i-1.
        accepted, bonus = kernels.linearspec_accept(block, logits.argmax(-1))
        if fill.sampled_rows is not None:
            rows = fill.sampled_rows
            chosen = sampling.select(rows)
            p = chosen.probs(logits[rows])
            K = self.block_size - 1
            u = chosen.uniforms(K + 1, ACCEPT_STREAM, p.device)
            accepted[rows], bonus[rows] = kernels.speculative_accept(
                block[rows, 1:], fill.draft_probs, p, u[:, :K], u[:, K])
        return accepted + 1, accepted, bonus
