"""Speculative sampling in LinearSpec keeps AR's output distribution exactly: the vectorised
decision equals its loop reference draw for draw, and a chi-square test over thousands of
simulated blocks accepts it and rejects two wrong samplers (the negative controls that show the
test has power)."""

import pytest
import torch

from distribution import chi_square_pvalue
from sglang_nemodiff.kernels.speculative import speculative_accept, speculative_accept_reference

V, B = 6, 5  # tiny vocabulary, 4 drafts per block


class MarkovTarget:
    """A toy AR model: p(next | last token) = M[last]; its drafter proposes every slot of a
    block from fixed distributions Q[slot] (it cannot see the other drafts, like a one-pass
    bidirectional draft), so drafts are right only some of the time."""

    def __init__(self, seed: int, temperature: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.M = torch.softmax(torch.randn(V, V, generator=g) * 2.0 / temperature, -1)
        self.Q = torch.softmax(torch.randn(B - 1, V, generator=g) * 2.0 / temperature, -1)


def simulate(model: MarkovTarget, accept_fn, n: int, tokens: int, seed: int, argmax_drafts: bool):
    """Run LinearSpec rounds for n independent sequences from seed token 0 until each has
    `tokens` new tokens; return the first `tokens` tokens [n, tokens]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, tokens), -1, dtype=torch.int64)
    filled = torch.zeros(n, dtype=torch.int64)
    last = torch.zeros(n, dtype=torch.int64)
    while bool((filled < tokens).any()):
        rows = (filled < tokens).nonzero().squeeze(1)
        r = rows.numel()
        q = model.Q.expand(r, B - 1, V)
        if argmax_drafts:
            drafts = q.argmax(-1)
            draft_probs = None
        else:
            drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(r, B - 1)
            draft_probs = q
        block = torch.cat([last[rows, None], drafts], 1)
        target = model.M[block]  # p_j = M[block[j]]
        u_accept = torch.rand(r, B - 1, generator=g)
        u_bonus = torch.rand(r, generator=g)
        accepted, bonus = accept_fn(drafts, draft_probs, target, u_accept, u_bonus)
        for i, row in enumerate(rows.tolist()):
            emitted = drafts[i, : int(accepted[i])].tolist() + [int(bonus[i])]
            for t in emitted:
                if filled[row] < tokens:
                    out[row, filled[row]] = t
                    filled[row] += 1
            last[row] = emitted[-1]
    return out


def _exact(model, tokens):
    """AR probabilities of every sequence of `tokens` tokens after token 0, in _codes order."""
    probs = model.M[0].clone()
    for _ in range(tokens - 1):
        last = torch.arange(probs.numel()) % V
        probs = (probs[:, None] * model.M[last]).reshape(-1)
    return probs


def _codes(seqs: torch.Tensor) -> torch.Tensor:
    code = torch.zeros(seqs.shape[0], dtype=torch.int64)
    for j in range(seqs.shape[1]):
        code = code * V + seqs[:, j]
    return code


def naive_accept_if_argmax(drafts, draft_probs, target, u_accept, u_bonus):
    """WRONG: accept a draft when it equals the verify argmax, emit it; bonus sampled from p."""
    K = drafts.shape[1]
    match = (drafts == target[:, :K].argmax(-1)).to(torch.int64)
    accepted = torch.cumprod(match, 1).sum(1)
    p_c = target[torch.arange(drafts.shape[0]), accepted]
    cdf = p_c.double().cumsum(-1)
    bonus = torch.searchsorted(cdf, (u_bonus.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return accepted, bonus.clamp(max=V - 1)


def no_ratio_test(drafts, draft_probs, target, u_accept, u_bonus):
    """WRONG: emit drafts whenever the target gives them any mass (no p/q ratio test)."""
    ones = torch.zeros_like(u_accept)
    return speculative_accept(drafts, draft_probs, target, ones, u_bonus)


@pytest.mark.parametrize("argmax_drafts", [False, True], ids=["sampled-drafts", "argmax-drafts"])
def test_vectorised_equals_loop_reference(argmax_drafts):
    g = torch.Generator().manual_seed(3)
    R = 64
    target = torch.softmax(torch.randn(R, B, V, generator=g) * 2, -1)
    target[:4] = torch.nn.functional.one_hot(target[:4].argmax(-1), V).float()  # greedy rows
    q = torch.softmax(torch.randn(R, B - 1, V, generator=g) * 2, -1)
    drafts = q.argmax(-1) if argmax_drafts else torch.multinomial(q.view(-1, V), 1, generator=g).view(R, -1)
    drafts[5] = target[5, : B - 1].argmax(-1)  # likely all accepted
    u_accept, u_bonus = torch.rand(R, B - 1, generator=g), torch.rand(R, generator=g)
    draft_probs = None if argmax_drafts else q
    got = speculative_accept(drafts, draft_probs, target, u_accept, u_bonus)
    ref = speculative_accept_reference(drafts, draft_probs, target, u_accept, u_bonus)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # One-hot targets with argmax drafts are greedy decoding: accept iff equal to the argmax.
    if argmax_drafts:
        greedy = target[:4].argmax(-1)
        match = (drafts[:4] == greedy[:, : B - 1]).long().cumprod(1).sum(1)
        assert torch.equal(got[0][:4], match)
        assert torch.equal(got[1][:4], greedy.gather(1, match[:, None]).squeeze(1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("argmax_drafts", [False, True], ids=["sampled-drafts", "argmax-drafts"])
def test_emitted_tokens_have_the_ar_distribution(temperature, argmax_drafts):
    model = MarkovTarget(seed=11, temperature=temperature)
    tokens = 3
    samples = simulate(model, speculative_accept, 20000, tokens, seed=5, argmax_drafts=argmax_drafts)
    assert chi_square_pvalue(_codes(samples), _exact(model, tokens)) > 1e-3


@pytest.mark.parametrize("wrong", [naive_accept_if_argmax, no_ratio_test],
                         ids=["accept-if-argmax", "no-ratio-test"])
def test_negative_controls_fail_the_same_test(wrong):
    """The distribution test bites: samplers known to be wrong are rejected at the same seed."""
    model = MarkovTarget(seed=11, temperature=1.0)
    samples = simulate(model, wrong, 20000, 3, seed=5, argmax_drafts=False)
    assert chi_square_pvalue(_codes(samples), _exact(model, 3)) < 1e-6
