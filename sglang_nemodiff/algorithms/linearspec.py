"""LinearSpec: one bidirectional draft pass fills every mask (draft LoRA on), one causal verify
pass (base weights) decides how many drafts to keep; the token after them is the bonus and next
seed. Exactly 2 forwards per block of B >= 2; a B = 1 round takes AR steps instead (ar_steps.py).

Greedy requests accept the longest prefix of drafts equal to the causal argmax (lossless: every
emitted token is a causal argmax, as in AR). Requests that sample accept by speculative sampling
(kernels/speculative.py) between the draft distribution q and the verify distribution p, both
after the request's temperature/top-k/top-p/min-p (and, for p, penalties and logit bias with the
drafts before each slot counted as generated): the emitted tokens have AR's distribution.
Requests with a grammar draft under its matcher and verify each slot under AR's mask for that
step (grammar.py)."""

from __future__ import annotations

import torch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import BlockFill, NLDBlockAlgorithm, masked_confidence_argmax
from sglang_nemodiff.algorithms.grammar import draft_under_grammar, settle
from sglang_nemodiff.algorithms.sampling import filtered_probs, sample_from

DRAFT_STREAM, ACCEPT_STREAM = 1, 2  # random streams of one round (seeded requests)


class NemodiffLinearSpec(NLDBlockAlgorithm):
    mode_name = "linearspec"
    supports_penalties = True
    supports_constrained_decoding = True

    takes_ar_steps = True  # B = 1 rounds: ar_steps.py

    def fill_block(self, model_runner, forward_batch, block, sampling):
        out = self.forward_pass(model_runner, forward_batch, causal=False, draft_lora=True)
        logits = out.logits_output.full_logits.view(*block.shape, -1)
        draft, _ = masked_confidence_argmax(logits, self.mask_id)
        fill = BlockFill(forwards=1)
        sample_drafts = self.settings.draft_sampling == "sample"
        if not sampling.all_greedy:
            rows = (~sampling.greedy).nonzero().squeeze(1)
            chosen = sampling.select(rows)
            masked = logits[rows, 1:].float()
            masked[..., self.mask_id] = float("-inf")  # a draft is never the mask token
            q = chosen.probs(masked)
            fill.sampled_rows = rows
            if sample_drafts:
                K, V = q.shape[1], q.shape[2]
                u = chosen.uniforms(K, DRAFT_STREAM, q.device)
                draft[rows, 1:] = sample_from(q.reshape(-1, V), u.reshape(-1)).view(-1, K)
                fill.draft_probs = q
            else:  # argmax drafts: q is a point mass on each draft
                draft[rows, 1:] = q.argmax(-1)
        if sampling.grammar_rows:
            self._grammar_drafts(logits, draft, sampling, fill, sample_drafts)
        block[:, 1:] = draft[:, 1:]
        return fill

    def _grammar_drafts(self, logits, draft, sampling, fill, sample_drafts):
        """Redraft the rows with a grammar left to right under its matcher (grammar.py)."""
        fill.grammar = {}
        sampled = fill.sampled_rows.tolist() if fill.sampled_rows is not None else []
        for row in sampling.grammar_rows:
            row_logits = logits[row, 1:].float().clone()
            row_logits[:, self.mask_id] = float("-inf")
            greedy = bool(sampling.greedy[row])
            params = sampling.select(torch.tensor([row], device=logits.device))
            u = params.uniforms(row_logits.shape[0], DRAFT_STREAM, logits.device)[0]

            def choose(masked_logits, slot):
                if greedy:
                    return int(masked_logits.argmax()), None
                q = filtered_probs(masked_logits[None], params.temperature, params.top_k,
                                   params.top_p, params.min_p)
                if not sample_drafts:
                    return int(q.argmax()), None
                return int(sample_from(q, u[slot : slot + 1])[0]), q[0]

            drafts, allowed, q, advanced = draft_under_grammar(sampling.grammars[row], row_logits, choose)
            draft[row, 1:] = drafts
            fill.grammar[row] = (allowed, advanced)
            if q is not None and fill.draft_probs is not None:
                fill.draft_probs[sampled.index(row)] = q

    def accept(self, block, verify, sampling, fill):
        logits = sampling.adjust(verify, block)
        for row, (allowed, _) in (fill.grammar or {}).items():
            logits[row] = logits[row].masked_fill(~allowed, float("-inf"))
        fill.verify_logits = logits
        # Greedy: draft i is accepted while it equals the causal argmax of slot i-1.
        accepted, bonus = kernels.linearspec_accept(block, logits.argmax(-1))
        if fill.sampled_rows is not None:
            rows = fill.sampled_rows
            chosen = sampling.select(rows)
            p = chosen.probs(logits[rows])
            K = block.shape[1] - 1
            u = chosen.uniforms(K + 1, ACCEPT_STREAM, p.device)
            accepted[rows], bonus[rows] = kernels.speculative_accept(
                block[rows, 1:], fill.draft_probs, p, u[:, :K], u[:, K])
        for row, (_, advanced) in (fill.grammar or {}).items():
            settle(sampling.grammars[row], advanced, int(accepted[row]), int(bonus[row]))
        return accepted + 1, accepted, bonus

    def emission_logits(self, verify, sampling, block, fill):
        return fill.verify_logits
