"""FastDiffuser: denoise a block, committing per step the most confident masked position plus
every masked position with confidence >= threshold; then one causal refresh pass keeps the whole
block's KV and yields the next seed (see base.py). With `denoise_lora: true` the denoise passes
run with the draft adapter (a self-distilled one predicts the model's own greedy continuation, so
it is confident at more positions per step); the refresh pass always uses the base weights.

At temperature > 0 each step samples x0 at every masked position from the request's tempered,
top-k/top-p/min-p-filtered distribution (mask token excluded) and uses that token's probability
under it as the confidence (the NLD reference's semantics); greedy requests take the argmax and
its softmax probability. The seed after the block is sampled from the causal pass like an AR
step. FastDiffuser decodes in parallel, so unlike LinearSpec its output distribution is its own,
not AR's. A request with a grammar (regex / JSON schema / EBNF) commits left to right, one token
per step, under the grammar matcher's mask: correct output, AR's speed."""

from __future__ import annotations

import torch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import BlockFill, NLDBlockAlgorithm, masked_confidence_argmax
from sglang_nemodiff.algorithms.grammar import mask_next_slot, next_token_allowed
from sglang_nemodiff.algorithms.rows import can_subset, row_subset
from sglang_nemodiff.algorithms.sampling import sample_from

SEED_STREAM = 1 << 20  # the refresh pass's draw; denoise step s uses stream s


class NemodiffFastDiffuser(NLDBlockAlgorithm):
    mode_name = "fastdiffuser"
    fill_pass, commit_pass = "denoise", "refresh"
    supports_constrained_decoding = True

    def __init__(self, config):
        super().__init__(config)
        self.threshold = float(self.settings.threshold)
        self.denoise_lora = bool(self.settings.denoise_lora)

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
        bs, B = block.shape
        positions = torch.arange(B, device=block.device)
        masked = block == self.mask_id
        masked[:, 0] = False  # the seed is committed
        steps = torch.zeros(bs, dtype=torch.int64, device=block.device)  # forwards per row
        commit_logits = None  # logprobs: the logits of the pass that committed each position
        subset_ok = can_subset(forward_batch)
        step = 0
        while bool(masked.any()):  # one host sync per step, like the stock dLLM loop
            # First done, first out: only the rows still denoising are forwarded (rows.py).
            rows = masked.any(1).nonzero().squeeze(1)
            if len(rows) == bs or not subset_ok:
                rows = torch.arange(bs, device=block.device)
                out = self.forward_pass(model_runner, forward_batch, causal=False,
                                        draft_lora=self.denoise_lora)
                params = sampling
            else:
                out = self.forward_pass(model_runner, row_subset(forward_batch, rows, block),
                                        causal=False, draft_lora=self.denoise_lora)
                params = sampling.select(rows)
            logits = out.logits_output.full_logits.view(len(rows), B, -1)
            x0_rows, confidence_rows = self._x0(logits, params, step)
            x0, confidence = block.clone(), torch.zeros(bs, B, device=block.device)
            x0[rows], confidence[rows] = x0_rows, confidence_rows.float()
            steps[rows] += 1
            step += 1
            # Masked positions with confidence >= threshold, plus the most confident one.
            commit = kernels.fastdiffuser_commit(confidence, masked, self.threshold)
            row_of = {row: k for k, row in enumerate(rows.tolist())}
            for row in sampling.grammar_rows:
                if row in row_of:
                    self._commit_under_grammar(row, logits[row_of[row]], masked, commit, x0, sampling, step)
            block.copy_(torch.where(commit, x0, block))
            if sampling.wants_logprobs:
                if commit_logits is None:
                    commit_logits = torch.zeros(bs, B, logits.shape[-1], device=logits.device)
                commit_logits[rows] = torch.where(commit[rows].unsqueeze(-1), logits.float(),
                                                  commit_logits[rows])
            masked &= ~commit
            if self.eos_id is not None:
                # EOS freeze: a committed EOS with no mask to its left ends the block with EOS.
                is_eos = (block == self.eos_id) & ~masked & (positions > 0)
                first_eos = torch.where(is_eos, positions, B).min(1, keepdim=True).values
                masks_before = (masked & (positions < first_eos)).any(1, keepdim=True)
                frozen = (first_eos < B) & ~masks_before
                block.copy_(torch.where(frozen & (positions > first_eos), self.eos_id, block))
                masked &= ~frozen
        return BlockFill(forwards=step, row_forwards=steps.tolist(), commit_logits=commit_logits)

    def _commit_under_grammar(self, row, row_logits, masked, commit, x0, sampling, step):
        """A request with a grammar commits left to right, one token per step, under the
        matcher's mask (a grammar can only follow a left-to-right order)."""
        commit[row] = False
        pending = masked[row].nonzero()
        grammar = sampling.grammars[row]
        if not len(pending):
            return
        if grammar.is_terminated():
            # The request ends at the terminating token: the rest of the block is filler
            # (EOS), committed at once so the block resolves.
            filler = self.eos_id if self.eos_id is not None else 0
            x0[row, pending[:, 0]] = filler
            commit[row, pending[:, 0]] = True
            return
        pos = int(pending[0])
        allowed = next_token_allowed(grammar, row_logits.shape[-1], row_logits.device)
        allowed[self.mask_id] = False
        slot_logits = row_logits[pos : pos + 1].float().masked_fill(~allowed, float("-inf"))
        params = sampling.select(torch.tensor([row], device=row_logits.device))
        token = int(self.next_tokens(slot_logits[None], params, stream=step)[0, 0])
        x0[row, pos] = token
        commit[row, pos] = True
        grammar.accept_token(token)

    def emission_logits(self, verify, sampling, block, fill):
        # Emitted token j (block[j + 1], then the seed after the block) and the pass that made it.
        return torch.cat([fill.commit_logits[:, 1:], verify[:, -1:].float()], 1)

    def accept(self, block, verify, sampling, fill):
        keep = torch.full((block.shape[0],), self.block_size, device=block.device)
        last = verify[:, -1:].float()
        mask_next_slot(last, sampling, 0)
        bonus = self.next_tokens(last, sampling, SEED_STREAM)[:, 0]
        for row in sampling.grammar_rows:
            if not sampling.grammars[row].is_terminated():
                sampling.grammars[row].accept_token(int(bonus[row]))
        return keep, None, bonus
