"""Constrained decoding (regex / JSON schema / EBNF through SGLang's grammar backend) for
LinearSpec blocks.

AR decoding masks each step's logits with the grammar matcher's next-token bitmask and then
advances the matcher by the chosen token. A LinearSpec block does the same for every slot at
once: the drafts are chosen left to right under the matcher's mask (so every draft is
grammatical) while the matcher advances through them, recording the mask of every slot; the
verify pass's slot j is masked with the state after drafts 1..j, exactly AR's mask at that step;
after acceptance the matcher is rolled back over the rejected drafts and advanced by the bonus
token. Masks are expanded from xgrammar's int32 bitmasks on the logits' device.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def active_grammar(req):
    grammar = getattr(req, "grammar", None)
    if grammar is None or getattr(grammar, "finished", False) or grammar.is_terminated():
        return None
    return grammar


def bitmask_to_allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar bitmask [n, ceil(V / 32)] int32 -> allowed [n, V] bool."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1
    return allowed.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def next_token_allowed(grammar, vocab_size: int, device) -> torch.Tensor:
    """allowed [V] for the matcher's current state."""
    bitmask = grammar.allocate_vocab_mask(vocab_size, 1, "cpu")
    grammar.fill_vocab_mask(bitmask, 0)
    return bitmask_to_allowed(bitmask, vocab_size)[0].to(device)


def mask_next_slot(logits: torch.Tensor, sampling, slot: int) -> None:
    """In place: logits [bs, n, V] at `slot`, for every row whose grammar is still running,
    limited to the tokens its matcher allows next (an AR step's mask)."""
    for row in sampling.grammar_rows:
        grammar = sampling.grammars[row]
        if not grammar.is_terminated():
            allowed = next_token_allowed(grammar, logits.shape[-1], logits.device)
            logits[row, slot] = logits[row, slot].masked_fill(~allowed, float("-inf"))


def draft_under_grammar(grammar, draft_logits: torch.Tensor,
                        choose: Callable[[torch.Tensor, int], tuple]):
    """Choose K drafts left to right under the grammar, advancing its matcher.

    draft_logits [K, V] (mask token already excluded); choose(masked_logits [V], slot) ->
    (token, q [V] or None). Returns (drafts [K], allowed [K + 1, V] per verify slot, q [K, V]
    or None, advanced). The matcher ends `advanced` tokens ahead; slots after a draft it could
    not take (or after it terminated) are left unmasked: acceptance stops before them, or the
    request finishes at the terminating token."""
    K, V = draft_logits.shape
    device = draft_logits.device
    allowed = torch.ones(K + 1, V, dtype=torch.bool, device=device)
    drafts = torch.empty(K, dtype=torch.int64, device=device)
    qs: Optional[torch.Tensor] = None
    advanced = 0
    for j in range(K):
        if grammar.is_terminated():
            drafts[j:] = draft_logits[j:].argmax(-1)
            break
        allowed[j] = next_token_allowed(grammar, V, device)
        token, q = choose(draft_logits[j].masked_fill(~allowed[j], float("-inf")), j)
        drafts[j] = token
        if q is not None:
            if qs is None:
                qs = torch.zeros(K, V, device=device)
            qs[j] = q
        grammar.accept_token(int(token))
        advanced += 1
    else:
        if not grammar.is_terminated():
            allowed[K] = next_token_allowed(grammar, V, device)
    if qs is not None and advanced < K:
        # After termination the drafts are plain argmaxes (the request ends at the terminating
        # token anyway): their q is a point mass.
        qs[advanced:] = torch.nn.functional.one_hot(drafts[advanced:], V).float()
    return drafts, allowed, qs, advanced


def settle(grammar, advanced: int, accepted: int, bonus: int) -> None:
    """After acceptance: drop the rejected drafts from the matcher and take the bonus token."""
    if advanced > accepted:
        grammar.rollback(advanced - accepted)
    if not grammar.is_terminated():
        grammar.accept_token(int(bonus))
