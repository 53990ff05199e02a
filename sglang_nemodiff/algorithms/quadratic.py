"""Quadratic self-speculation: one forward per round verifies the current block and drafts the
next one for every possible acceptance length (quadratic_layout.py has the round's shape).

The scheduler places `[d_0, d_1..d_{L-1}, L groups of masks]` at the seed (d_0 is the seed, the
last round's bonus; d_1.. the drafts that round made, mask ids where none were made:
patches/dllm_req_fill_ids.py) with the layout's positions (patches/dllm_block_positions.py).
One forward then gives, on the block rows, AR's logits after each d_i (causal, base weights) and,
on group i, the drafts of the block that follows if d_0..d_i are accepted (draft adapter).

Acceptance is LinearSpec's (linearspec.py): greedy requests keep drafts while they equal the
causal argmax, sampling requests by speculative sampling against argmax drafts (a point-mass
q: accept d with probability p(d), else sample the residual), so the output is exactly AR's,
or has AR's distribution. n = tokens kept (d_0 included): their KV (the first n slots, causal)
stays, the stash frees the rest. The next block's drafts are group n-1's argmax predictions for
the slots after the bonus (none if a sparse round drafted no group n-1); they ride on the
request's RoundResult (`next_drafts`) to its next round. Drafts are always argmax here (a sampled draft would need its q kept between rounds).

Under `block_size: auto` the round's plan may instead be AR steps or a LinearSpec round of B
(quadratic_policy.py): those run LinearSpec's code, drafted by this server's adapter."""

from __future__ import annotations


import torch

from sglang_nemodiff.algorithms.base import BlockFill, masked_confidence_argmax
from sglang_nemodiff.algorithms.linearspec import NemodiffLinearSpec
from sglang_nemodiff.stats import RoundResult


class NemodiffQuadratic(NemodiffLinearSpec):
    mode_name = "quadratic"
    supports_penalties = True
    supports_constrained_decoding = False  # grammar drafting/verifying per group: not built
    # Only these attention paths draw a quadratic round's pattern; any other would run the block
    # rows bidirectionally (not AR). SGLang moves a server asked for another one to `nemodiff`.
    supported_attention_backends = ("torch_native", "nemodiff")
    required_attention_backend = "nemodiff"
    # Under `block_size: auto` the policy may run a batch as AR steps or as a LinearSpec round
    # (quadratic_policy.py); the quadratic round after them starts without drafts.
    takes_ar_steps = True

    def _block_round(self, model_runner, forward_batch, plan, sampling, started):
        layout = plan.layout
        if layout is None:  # `auto` chose a LinearSpec round (draft and verify passes)
            assert plan.slots == plan.block_size, f"a quadratic server got a {plan} round"
            return super()._block_round(model_runner, forward_batch, plan, sampling, started)
        bs, L, g, k = forward_batch.batch_size, layout.block_len, layout.group, layout.n_groups
        ids = forward_batch.input_ids.view(bs, layout.tokens)
        block = ids[:, :L]
        out = self.forward_pass(model_runner, forward_batch, causal=False, draft_lora=True,
                                layout=layout)
        logits = out.logits_output.full_logits.view(bs, layout.tokens, -1)
        verify = logits[:, :L]
        fill = BlockFill(forwards=1)
        if not sampling.all_greedy:
            fill.sampled_rows = (~sampling.greedy).nonzero().squeeze(1)  # argmax drafts: q = None
        keep, accepted, bonus = self.accept(block, verify, sampling, fill)
        # Group keep-1 drafted the block after the bonus; its rows from first_draft_row on. A
        # sparse round has no group past its first k: the next round starts without drafts.
        groups = logits[:, L:].view(bs, k, g, -1)
        index = (keep - 1).clamp(max=k - 1).to(groups.device)
        chosen = groups[torch.arange(bs, device=groups.device), index]
        drafts, _ = masked_confidence_argmax(chosen[:, layout.first_draft:], self.mask_id)
        drafted = (keep <= k).tolist()
        drafts = [row[:L - 1] if ok else [] for row, ok in zip(drafts.tolist(), drafted)]
        keep_list, accepted_list = keep.tolist(), accepted.tolist()
        # A request without drafts this round (its first, or after a sparse round drafted none,
        # or AR steps) observes no acceptance: its rejected mask ids say nothing of the drafts.
        had_drafts = (block[:, 1] != self.mask_id).tolist() if L > 1 else [False] * bs
        record = self._round_record(started, L, tuple(a if d else None for a, d in zip(accepted_list, had_drafts)),
                                    groups=k)
        tokens, logprobs = self._emitted(block, keep, bonus, sampling, lambda: fill.verify_logits)
        results = [RoundResult(passes=(("quadratic", 1),), tokens=keep_list[i], keep=keep_list[i],
                               accepted=accepted_list[i], block_size=L, logprobs=logprobs[i],
                               record=record, next_drafts=tuple(drafts[i]), groups=k)
                   for i in range(bs)]
        return out.logits_output, tokens, None, results, out.can_run_graph
