"""LinearSpec's B = 1: AR steps taken inside one block round.

A B = 1 round is AR itself: no draft, one causal forward, one token. Taken one per scheduler
round, it pays SGLang's whole dLLM round (request admission, fill ids, batch assembly, KV
allocation, the result path, the KV stash) for every token: at concurrency 32 on the bundled
model that work was ~20% of the scheduler's time, against ~3% in SGLang's AR decode loop, and
B = 1 ran at 0.76-0.84x AR. So a B = 1 round places a block of `ar_steps` slots (settings) and
runs up to that many AR decode steps over it, one decode-shaped forward per step
(`rows.decode_step`): step j feeds slot j's token, writes slot j's KV and yields the token of
slot j + 1. The scheduler's work is paid once per `ar_steps` tokens.

Every token is an AR step's: the argmax (greedy) or a sample from the request's distribution
after penalties (counting the round's earlier tokens as generated) and the grammar's mask,
exactly what AR decoding computes at that position. A row leaves the loop once it emits a stop
token, reaches its max_new_tokens or its grammar terminates; the slots it did not reach are
freed by the KV stash (`keep`), as LinearSpec's rejected drafts are.

The round ends early after a step in which a request reached the scheduler (`arrivals`,
patches/dllm_arrivals.py) when enough of its steps are left for that to pay (the plan's
`yield_steps_left`, decided by the block policy): SGLang admits requests between batches, so a
request arriving during a round of `ar_steps` steps would wait for all of them, where SGLang's
decode loop admits it after one step. Ending the round there changes no token: each row keeps
the steps it took and its last token is the next round's seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from sglang_nemodiff.algorithms.grammar import mask_next_slot, settle
from sglang_nemodiff.algorithms.rows import decode_step
from sglang_nemodiff.algorithms.sampling import BatchSampling, _stop_tokens

STEP_STREAM = 2  # the random stream of a step's draw (its position differs per step)


@dataclass
class ARSteps:
    """What the AR steps of one round produced."""

    keep: torch.Tensor  # [bs] steps each row took (= tokens emitted = block slots whose KV stays)
    bonus: torch.Tensor  # [bs] each row's last token: the next seed
    logits: Optional[torch.Tensor]  # [bs, B, V] adjusted logits of every step (logprob requests)
    logits_output: object  # the last step's LogitsProcessorOutput


def row_budgets(reqs, bs: int, B: int) -> list:
    """Steps each request may take this round: B, or fewer when its max_new_tokens is nearer."""
    if reqs is None or len(reqs) != bs:
        return [B] * bs
    return [max(1, min(B, r.sampling_params.max_new_tokens - len(r.output_ids))) for r in reqs]


def row_stop_tokens(reqs, bs: int) -> list:
    """Per request, the tokens that end it (none with ignore_eos)."""
    if reqs is None or len(reqs) != bs:
        return [set()] * bs
    return [set() if r.sampling_params.ignore_eos else _stop_tokens(r) for r in reqs]


def run_ar_steps(algorithm, model_runner, forward_batch, block: torch.Tensor,
                 sampling: BatchSampling, yield_steps_left: Optional[int] = 1) -> ARSteps:
    """Up to B AR steps over block [bs, B] (slot 0 holds the seed; slots are filled in place);
    ended after a step in which a request arrived if `yield_steps_left` or more were left."""
    bs, B = block.shape
    device = block.device
    reqs = algorithm.round_reqs
    arrivals = getattr(algorithm, "arrivals", None)  # whether a request reached the scheduler
    if yield_steps_left is None:
        arrivals = None
    budgets = row_budgets(reqs, bs, B)
    stops = row_stop_tokens(reqs, bs)
    keep = torch.zeros(bs, dtype=torch.int64, device=device)
    bonus = block[:, 0].clone()
    live = list(range(bs))
    step_logits = [] if sampling.wants_logprobs else None
    logits_output = None
    for j in range(B):
        rows = torch.tensor(live, dtype=torch.int64, device=device)
        sub = decode_step(forward_batch, rows, j, B, block[rows, j])
        out = algorithm.forward_pass(model_runner, sub, causal=True)
        logits_output = out.logits_output
        step_out = logits_output.next_token_logits.float()
        if len(live) == bs:
            logits = step_out.unsqueeze(1)
        else:
            # Every row's logits for this step (rows that left: zeros, never read) so the
            # batch's sampling parameters, penalties and grammars apply row for row.
            logits = step_out.new_zeros(bs, 1, step_out.shape[-1])
            logits[rows, 0] = step_out
        logits = sampling.adjust(logits, block, start=j)
        mask_next_slot(logits, sampling, 0)
        step = dataclasses.replace(sampling, positions=[p + j for p in sampling.positions])
        tokens = algorithm.next_tokens(logits, step, STEP_STREAM)[:, 0]
        if step_logits is not None:
            step_logits.append(logits[:, 0])
        still = []
        for row, token in zip(live, tokens[rows].tolist()):
            grammar = sampling.grammars[row] if sampling.grammars else None
            if grammar is not None:
                settle(grammar, 0, 0, token)
            keep[row] = j + 1
            bonus[row] = token
            if j + 1 < B:
                block[row, j + 1] = token
            done = (j + 1 >= budgets[row] or token in stops[row]
                    or (grammar is not None and grammar.is_terminated()))
            if not done:
                still.append(row)
        live = still
        if not live or (arrivals is not None and B - (j + 1) >= yield_steps_left and arrivals()):
            break
    logits = None
    if step_logits is not None:
        logits = torch.stack(step_logits, 1)
        if logits.shape[1] < B:  # slots no row reached: never read (keep bounds the emission)
            pad = logits.new_zeros(bs, B - logits.shape[1], logits.shape[-1])
            logits = torch.cat([logits, pad], 1)
    return ARSteps(keep=keep, bonus=bonus, logits=logits, logits_output=logits_output)
