"""Per-step decisions over logits: fused confidence/argmax kernel and batched commit rules.

``confidence_argmax(logits, mask_id)`` computes, per row, the argmax over the vocabulary with the
mask token excluded and that token's softmax probability with the mask token *kept* in the
denominator (FastDiffuser's confidence: the mask token is never committed, but its probability
mass still lowers every other token's confidence). One pass over V with an online softmax (running
max, running sum of exponentials, running best value/index): no [N, V] fp32 intermediate. For few
rows (N=32 at V=131072 would be 32 programs) the vocabulary is also split across programs and a
tiny second kernel merges the partial (max, sum, best, index) tuples.

The decision functions (``fastdiffuser_commit``, ``linearspec_accept``) are vectorised torch,
free of host syncs, so they can run on the GPU inside a step (or a CUDA graph). Each has a plain
Python loop reference next to it.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import triton
import triton.language as tl

from .device import _sm_count
from .dispatch import triton_interpreting

# A constexpr: a compiled (non-interpreted) kernel may read no other kind of global.
_INT_BIG = tl.constexpr(2147483647)




# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _better(val_a, idx_a, val_b, idx_b):
    # Is candidate a better than b? Higher value wins; equal values -> lower index (torch.argmax).
    return (val_a > val_b) | ((val_a == val_b) & (idx_a < idx_b))


@triton.jit
def _conf_pass(
    Logits, Token, Prob, Part_m, Part_s, Part_bv, Part_bi,
    stride_n, V, mask_id, chunk,
    BLOCK_V: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, V)
    base = Logits + row.to(tl.int64) * stride_n
    offs = tl.arange(0, BLOCK_V)
    # Running state as scalars. The max starts finite so an all -inf tile gives exp(-inf) = 0,
    # never exp(-inf - -inf) = nan.
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.full([], 0.0, tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], _INT_BIG, tl.int32)
    for start in range(lo, hi, BLOCK_V):
        idx = start + offs
        ok = idx < hi
        # load then convert at once (the interpreter cannot do bf16 arithmetic)
        x = tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        cand_ok = ok & (idx != mask_id)
        xa = tl.where(cand_ok, x, float("-inf"))
        t_best = tl.max(xa, 0)
        t_idx = tl.min(tl.where(cand_ok & (xa == t_best), idx, _INT_BIG), 0)
        upd = _better(t_best, t_idx, best, best_i)
        best = tl.where(upd, t_best, best)
        best_i = tl.where(upd, t_idx, best_i)
    if NUM_SPLITS == 1:
        tl.store(Token + row, best_i.to(tl.int64))
        tl.store(Prob + row, tl.exp(best - m) / s)
    else:
        o = row * NUM_SPLITS + sp
        tl.store(Part_m + o, m)
        tl.store(Part_s + o, s)
        tl.store(Part_bv + o, best)
        tl.store(Part_bi + o, best_i)


@triton.jit
def _conf_merge(Token, Prob, Part_m, Part_s, Part_bv, Part_bi,
                NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, SPLITS_P2)
    ok = offs < NUM_SPLITS
    o = row * NUM_SPLITS + offs
    m = tl.load(Part_m + o, mask=ok, other=-1.0e30)
    s = tl.load(Part_s + o, mask=ok, other=0.0)
    bv = tl.load(Part_bv + o, mask=ok, other=float("-inf"))
    bi = tl.load(Part_bi + o, mask=ok, other=_INT_BIG)
    m_all = tl.max(m, 0)
    s_all = tl.sum(s * tl.exp(m - m_all), 0)
    best = tl.max(bv, 0)
    # splits cover increasing index ranges, so min index among the maxima = lowest index overall
    best_i = tl.min(tl.where(bv == best, bi, _INT_BIG), 0)
    tl.store(Token + row, best_i.to(tl.int64))
    tl.store(Prob + row, tl.exp(best - m_all) / s_all)




def confidence_argmax(logits: torch.Tensor, mask_id: int, *, num_splits: int = None,
                      block_v: int = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (fp32/fp16/bf16) -> (token [N] int64, prob [N] float32).

    token = argmax over V with ``mask_id`` excluded (ties: lowest index); prob = softmax(logits)
    [token] with ``mask_id`` kept in the softmax denominator. ``num_splits``/``block_v`` override
    the V-split count and tile (tests).
    """
    assert logits.dim() == 2
    N, V = logits.shape
    dev = logits.device
    token = torch.empty(N, dtype=torch.int64, device=dev)
    prob = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return token, prob
    assert V > 0
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    interpret = triton_interpreting() or dev.type != "cuda"
    if block_v is None:
        block_v = 1024 if interpret else 4096
    block_v = min(block_v, triton.next_power_of_2(V))
    n_tiles = triton.cdiv(V, block_v)
    if num_splits is None:
        num_splits = 1
        if not interpret:
            # aim for ~4 programs per SM; each split keeps >= 2 tiles
            target = 4 * _sm_count(dev)
            num_splits = max(1, min(target // N, n_tiles // 2, 64))
    num_splits = max(1, min(int(num_splits), n_tiles))
    chunk = triton.cdiv(n_tiles, num_splits) * block_v
    num_splits = triton.cdiv(V, chunk)  # drop splits that would be empty
    if num_splits > 1:
        part_m = torch.empty(N * num_splits, dtype=torch.float32, device=dev)
        part_s = torch.empty_like(part_m)
        part_bv = torch.empty_like(part_m)
        part_bi = torch.empty(N * num_splits, dtype=torch.int32, device=dev)
    else:
        part_m = part_s = part_bv = prob
        part_bi = token
    num_warps = 1 if interpret else (8 if block_v >= 4096 else 4)
    _conf_pass[(N, num_splits)](
        logits, token, prob, part_m, part_s, part_bv, part_bi,
        logits.stride(0), V, int(mask_id), chunk,
        BLOCK_V=block_v, NUM_SPLITS=num_splits, num_warps=num_warps,
    )
    if num_splits > 1:
        _conf_merge[(N,)](token, prob, part_m, part_s, part_bv, part_bi,
                          NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
                          num_warps=1)
    return token, prob


def confidence_argmax_reference(logits: torch.Tensor, mask_id: int):
    """torch: fp32 softmax over all V (mask kept), argmax with the mask id set to -inf."""
    x = logits.float()
    p = torch.softmax(x, dim=-1)
    xm = x.clone()
    xm[:, mask_id] = float("-inf")
    token = torch.argmax(xm, dim=-1)
    return token, p.gather(1, token[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------
# Batched decision rules (host-sync free)
# --------------------------------------------------------------------------------------------


def fastdiffuser_commit(prob: torch.Tensor, is_masked: torch.Tensor,
                        threshold: Union[float, torch.Tensor]) -> torch.Tensor:
    """FastDiffuser commit rule over [R, B] block positions -> bool commit mask [R, B].

    Commit every masked position with prob >= threshold, plus always the single most confident
    masked position of each row (lowest index on ties); rows without masks commit nothing.
    ``threshold`` is a float or a per-row [R] tensor.
    """
    is_masked = is_masked.bool()
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 1:
        threshold = threshold[:, None]
    commit = is_masked & (prob >= threshold)
    conf = torch.where(is_masked, prob.float(), torch.full_like(prob, float("-inf"),
                                                                 dtype=torch.float32))
    best = torch.argmax(conf, dim=1, keepdim=True)  # first maximal index, as documented by torch
    top = torch.zeros_like(commit).scatter_(1, best, True) & is_masked.any(dim=1, keepdim=True)
    return commit | top


def fastdiffuser_commit_reference(prob, is_masked, threshold):
    R, B = is_masked.shape
    out = torch.zeros(R, B, dtype=torch.bool)
    for r in range(R):
        th = float(threshold[r]) if isinstance(threshold, torch.Tensor) and threshold.dim() == 1 \
            else float(threshold)
        best, best_p = -1, None
        for i in range(B):
            if not bool(is_masked[r, i]):
                continue
            p = float(prob[r, i])
            if p >= th:
                out[r, i] = True
            if best_p is None or p > best_p:
                best, best_p = i, p
        if best >= 0:
            out[r, best] = True
    return out.to(is_masked.device)


def linearspec_accept(block: torch.Tensor, verify_argmax: torch.Tensor):
    """LinearSpec acceptance over [R, B]: block = [seed, draft_1..draft_{B-1}], verify_argmax =
    the causal argmax at each block position. accept_len c = number of leading i >= 1 with
    block[i] == verify_argmax[i-1] (0..B-1); bonus = verify_argmax[c]. Returns (c [R] int64,
    bonus [R])."""
    match = (block[:, 1:] == verify_argmax[:, :-1]).to(torch.int64)
    accept_len = torch.cumprod(match, dim=1).sum(dim=1)
    bonus = verify_argmax.gather(1, accept_len[:, None]).squeeze(1)
    return accept_len, bonus


def linearspec_accept_reference(block, verify_argmax):
    R, B = block.shape
    acc, bon = [], []
    for r in range(R):
        c = 0
        for i in range(1, B):
            if int(block[r, i]) != int(verify_argmax[r, i - 1]):
                break
            c += 1
        acc.append(c)
        bon.append(int(verify_argmax[r, c]))
    return (torch.tensor(acc, dtype=torch.int64, device=block.device),
            torch.tensor(bon, dtype=verify_argmax.dtype, device=block.device))
