"""LinearSpec acceptance at temperature > 0: speculative sampling over one block, batched.

A block is `[seed, d_1 .. d_K]` (K = B - 1 drafts). The draft pass gave each draft its
distribution q_i (or, for argmax drafts, a point mass on d_i); the causal verify pass gave the
target distribution p_j at every block slot j (p_j is the distribution of the token after
block[j], i.e. of the token draft d_{j+1} proposes). Both are the request's processed
distributions (temperature, top-k, top-p, min-p, penalties). Standard speculative sampling
(Leviathan et al. 2023; Chen et al. 2023):

    accept d_i with probability min(1, p_{i-1}(d_i) / q_i(d_i)), left to right;
    at the first rejection (slot c = i - 1) the bonus token is sampled from
        normalize(max(0, p_c - q_{c+1}));
    if every draft is accepted, the bonus is sampled from p_K.

The emitted tokens d_1..d_c, bonus then have exactly the distribution of sampling token by
token from p (AR decoding). With a point-mass q (argmax drafts) the ratio is p(d_i) and the
residual is p_c with d_{c+1} removed. Randomness is passed in (`u_accept`, `u_bonus`, uniform in
[0, 1)), so callers choose the generator (per-request seeds, or one stream) and tests can
replay the exact same draws through the loop reference below.

`speculative_accept` is vectorised torch with no host sync (one gather over the drafts, a
cumulative product for the accepted prefix, inverse-CDF sampling of the bonus);
`speculative_accept_reference` is the same rule written as a plain loop, for tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _sample_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised non-negative `weights` [R, V] with uniforms `u` [R]."""
    cdf = weights.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=weights.shape[-1] - 1)


def speculative_accept(drafts: torch.Tensor, draft_probs: Optional[torch.Tensor],
                       target_probs: torch.Tensor, u_accept: torch.Tensor,
                       u_bonus: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """drafts [R, K] int64; draft_probs [R, K, V] (None: argmax drafts, point masses);
    target_probs [R, K+1, V]; u_accept [R, K]; u_bonus [R].

    Returns (accepted [R] int64 in 0..K, bonus [R] int64)."""
    R, K = drafts.shape
    p_at = target_probs[:, :K].gather(-1, drafts.unsqueeze(-1)).squeeze(-1).float()
    if draft_probs is None:
        ratio = p_at
    else:
        q_at = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1).float()
        ratio = p_at / q_at.clamp_min(torch.finfo(torch.float32).tiny)
    accept = (u_accept.float() < ratio).to(torch.int64)
    accepted = torch.cumprod(accept, dim=1).sum(dim=1)

    rows = torch.arange(R, device=drafts.device)
    p_c = target_probs[rows, accepted].float()  # [R, V]
    rejected = accepted < K
    next_draft = drafts.gather(1, accepted.clamp(max=K - 1).unsqueeze(1)).squeeze(1)
    if draft_probs is None:
        q_next = torch.zeros_like(p_c)
        q_next[rows, next_draft] = p_c[rows, next_draft]  # remove d_{c+1} from p_c
    else:
        q_next = draft_probs[rows, accepted.clamp(max=K - 1)].float()
    residual = (p_c - q_next).clamp_min_(0.0)
    # All accepted: the bonus comes from p_K itself. A residual with no mass can only follow a
    # rejection of probability 0 (float round-off): fall back to p_c.
    empty = residual.sum(-1) <= 0
    residual = torch.where((rejected & ~empty).unsqueeze(-1), residual, p_c)
    return accepted, _sample_inverse_cdf(residual, u_bonus)


def speculative_accept_reference(drafts, draft_probs, target_probs, u_accept, u_bonus):
    """The same rule, one row and one draft at a time."""
    R, K = drafts.shape
    accepted, bonus = [], []
    for r in range(R):
        c = 0
        while c < K:
            d = int(drafts[r, c])
            p = float(target_probs[r, c, d])
            q = 1.0 if draft_probs is None else float(draft_probs[r, c, d])
            if not float(u_accept[r, c]) < p / max(q, torch.finfo(torch.float32).tiny):
                break
            c += 1
        p_c = target_probs[r, c].float()
        weights = p_c
        if c < K:
            d = int(drafts[r, c])
            if draft_probs is None:
                q_next = torch.zeros_like(p_c)
                q_next[d] = p_c[d]
            else:
                q_next = draft_probs[r, c].float()
            residual = (p_c - q_next).clamp_min(0.0)
            if float(residual.sum()) > 0:
                weights = residual
        accepted.append(c)
        bonus.append(int(_sample_inverse_cdf(weights[None], u_bonus[r : r + 1])[0]))
    device = drafts.device
    return (torch.tensor(accepted, dtype=torch.int64, device=device),
            torch.tensor(bonus, dtype=torch.int64, device=device))
