"""Statistics for the sampling tests: a chi-square goodness-of-fit test, and the exact AR
distribution of a prompt's first two tokens from the oracle, filtered by SGLang's own AR sampler
code (an implementation independent of the one under test)."""

from __future__ import annotations

import math

import torch


def _chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (Wilson-Hilferty; ample for p-values
    far from the thresholds the tests use)."""
    if dof <= 0:
        return 1.0
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_pvalue(samples: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """samples [N] category ids; expected [C] probabilities. Rare categories are pooled."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=expected.numel()).double()
    exp = expected.double() * n
    rare = exp < min_expected
    obs = torch.cat([observed[~rare], observed[rare].sum().view(1)])
    ex = torch.cat([exp[~rare], exp[rare].sum().view(1)])
    keep = ex > 0
    stat = float(((obs[keep] - ex[keep]) ** 2 / ex[keep]).sum())
    return _chi2_sf(stat, int(keep.sum()) - 1)


def ar_step_probs(model, ids, temperature: float, top_p: float = 1.0, top_k: int = 1 << 30) -> torch.Tensor:
    """The distribution SGLang's AR sampler draws the token after `ids` from."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    logits, _ = model(torch.tensor(ids), None, causal=True)
    probs = torch.softmax(logits[-1:].float() / temperature, -1)
    _, kept, index, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([0.0]), False, None,
        None, return_filtered_probs=True)
    full = torch.zeros_like(probs).scatter_(-1, index.long(), kept)[0]
    return full / full.sum()


def ar_pair_distribution(model, prompt, temperature: float, top_p: float = 1.0) -> dict:
    """{(t1, t2): probability} of AR's first two tokens after `prompt`."""
    first = ar_step_probs(model, prompt, temperature, top_p)
    pairs = {}
    for t1 in (first > 0).nonzero().flatten().tolist():
        second = ar_step_probs(model, prompt + [t1], temperature, top_p)
        for t2 in (second > 0).nonzero().flatten().tolist():
            pairs[(t1, t2)] = float(first[t1] * second[t2])
    return pairs


def pair_test(pairs: dict, outputs) -> tuple[float, int]:
    """(chi-square p-value, samples outside AR's support) of sampled output id lists."""
    observed = [tuple(ids[:2]) for ids in outputs]
    keys = sorted(set(pairs) | set(observed))
    index = {k: i for i, k in enumerate(keys)}
    expected = torch.tensor([pairs.get(k, 0.0) for k in keys])
    outside = sum(1 for k in observed if k not in pairs)
    samples = torch.tensor([index[k] for k in observed])
    return chi_square_pvalue(samples, expected / expected.sum()), outside


def triple_cells(reference, prompt, temperature, top_p, min_pair=0.005):
    """AR's exact probabilities of the first three tokens, as cells fixed before sampling: every
    (t1, t2, t3) whose (t1, t2) has probability >= min_pair, and one cell for all other pairs
    (the third token's distribution is only needed after the likely pairs)."""
    first = ar_step_probs(reference, prompt, temperature, top_p)
    cells, other, support = {}, 0.0, set()
    for t1 in (first > 0).nonzero().flatten().tolist():
        second = ar_step_probs(reference, prompt + [t1], temperature, top_p)
        for t2 in (second > 0).nonzero().flatten().tolist():
            pair = float(first[t1] * second[t2])
            support.add((t1, t2))
            if pair < min_pair:
                other += pair
                continue
            third = ar_step_probs(reference, prompt + [t1, t2], temperature, top_p)
            for t3 in (third > 0).nonzero().flatten().tolist():
                cells[(t1, t2, t3)] = pair * float(third[t3])
    return cells, other, support


def triple_pvalue(cells, outputs):
    """(chi-square p-value, samples outside AR's support) of the outputs' first three tokens."""
    cells, other, support = cells
    keys = sorted(cells)
    index = {k: i for i, k in enumerate(keys)}
    expected = torch.tensor([cells[k] for k in keys] + [other])
    likely = {k[:2] for k in keys}
    samples, outside = [], 0
    for ids in outputs:
        t = tuple(ids[:3])
        if t in index:
            samples.append(index[t])
        elif t[:2] in support and t[:2] not in likely:
            samples.append(len(keys))  # a pair below min_pair
        else:
            outside += 1
    return chi_square_pvalue(torch.tensor(samples), expected / expected.sum()), outside
