"""Structured-mask attention over SGLang's paged (token-level) KV cache.

One Triton kernel serves the two attention patterns NLD needs, for a ragged batch of requests in
one launch, without a dense mask tensor:

* ``CAUSAL`` (0): new token i sees the prefix and new tokens 0..i (prefill, AR, LinearSpec verify,
  FastDiffuser KV refresh).
* ``BLOCK_BIDIRECTIONAL`` (1): every new token sees the prefix and all new tokens of its request
  (FastDiffuser denoise, LinearSpec draft).
* ``SEED_CAUSAL`` (2): block-bidirectional, except that new token 0 (the block's seed) sees only
  the prefix and itself (the draft pass of models with ``causal_seed``, config.py).
* ``QUADRATIC`` (3): a quadratic self-speculation round of ``quadratic = (L, g[, groups])``
  (quadratic_layout.py): block rows 0..L-1 causal among themselves; the g masks after block token
  i (rows L + i g ..) see block tokens 0..i and their own group. One layout per launch.

Layout follows SGLang's extend attention: queries/new K/V of all requests are concatenated along
the token axis (``extend_start_loc``/``extend_lens``), the cached prefix of request b lives at
``k_cache[req_to_token[req_pool_indices[b], :prefix_lens[b]]]``.

Design (after Triton's fused-attention tutorial, with two changes for the decode-ish shapes NLD
runs: a block of 32 new tokens over a long prefix):

1. GQA packing. One program owns BLOCK_M query *tokens* x all G = Hq/Hkv query heads of one KV
   head, i.e. a [BLOCK_M*G, D] query tile (row r = token r // GP, head r % GP). Each K/V tile is
   therefore loaded once for the whole head group instead of G times: small-Q attention is memory
   bound on the prefix, so this divides the dominant traffic by G.
2. Split-KV over the prefix (flash-decoding). When there are too few query tiles to fill the GPU
   (e.g. 32 new tokens, batch 1 -> 8 programs), the prefix is cut into NUM_SPLITS chunks processed
   by separate programs which write a normalised partial output plus its log-sum-exp; a second
   small kernel merges them. The new-token (masked) part is done by the last split only.

Masked-tile skipping: for each query tile the kernel loops only over the new-token keys that can be
visible at all (causal: keys <= the tile's last row; block-bidirectional: all of them). The prefix
loop has no mask arithmetic beyond the ragged tail.

Numerics: fp32 accumulation and an online softmax in base 2 (``exp2`` with log2(e) folded into the
scale). The running max starts at a large finite negative value so that a row with no visible key
in a tile never produces ``inf - inf``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .device import _sm_count
from .dispatch import triton_interpreting

CAUSAL = 0
BLOCK_BIDIRECTIONAL = 1
SEED_CAUSAL = 2
QUADRATIC = 3
MASK_KINDS = (CAUSAL, BLOCK_BIDIRECTIONAL, SEED_CAUSAL, QUADRATIC)

_LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max / empty-split lse (avoids inf - inf = nan).
_NEG_BIG = -1.0e30




# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, DOT_FP32: tl.constexpr):
    # q: [R, BD], k/v: [N, BD], visible: [R, N] bool. Returns updated (acc, l_i, m_i).
    if DOT_FP32:
        # fp32 inputs (or the interpreter, where 16-bit dots are emulated anyway): exact fp32.
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(visible, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc += tl.dot(p, v, input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _structured_attn_fwd(
    Q, K_new, V_new, K_cache, V_cache, O, O_part, Lse_part,
    Req_to_token, Req_pool_idx, Prefix_lens, Extend_start, Extend_lens, Mask_kinds, Quad,
    qk_scale, num_kv_heads,
    stride_qt, stride_qh,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kct, stride_kch, stride_vct, stride_vch,
    stride_ot, stride_oh,
    stride_r2t,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads

    ext_len = tl.load(Extend_lens + b).to(tl.int32)
    m_start = pid_m * BLOCK_M
    # Grid is sized for the longest request; tiles past this request's end have nothing to do.
    if m_start >= ext_len:
        return
    ext_start = tl.load(Extend_start + b).to(tl.int64)
    prefix_len = tl.load(Prefix_lens + b).to(tl.int32)
    req_row = tl.load(Req_pool_idx + b).to(tl.int64)

    # Row r of the tile = (token m_start + r // GP, query head kvh*G + r % GP).
    offs_r = tl.arange(0, BLOCK_R)
    m_idx = m_start + offs_r // GP
    g_idx = offs_r % GP
    row_ok = (m_idx < ext_len) & (g_idx < G)
    head = kvh * G + g_idx
    tok = ext_start + m_idx.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)  # also the interpreter's bf16 workaround: convert right after load

    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - 1.0e30

    # ---- 1. cached prefix: visible to every row of every kind; only the ragged tail is masked.
    if NUM_SPLITS == 1:
        p_lo = 0
        p_hi = prefix_len
    else:
        chunk = tl.cdiv(tl.cdiv(prefix_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        p_lo = tl.minimum(pid_s * chunk, prefix_len)
        p_hi = tl.minimum(p_lo + chunk, prefix_len)
    r2t_row = Req_to_token + req_row * stride_r2t
    for start in range(p_lo, p_hi, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < p_hi
        slot = tl.load(r2t_row + cols, mask=c_ok, other=0).to(tl.int64)
        kv_mask = c_ok[:, None] & d_ok[None, :]
        k = tl.load(K_cache + slot[:, None] * stride_kct + kvh * stride_kch + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V_cache + slot[:, None] * stride_vct + kvh * stride_vch + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, l_i, m_i = _online_softmax_tile(acc, l_i, m_i, q, k, v, c_ok[None, :], qk_scale,
                                             DOT_FP32)

    # ---- 2. new tokens (structured mask), done by the last split only.
    if pid_s == NUM_SPLITS - 1:
        kind = tl.load(Mask_kinds + b).to(tl.int32)
        # A quadratic round's (L, g), read from memory like the kind: a captured graph replays
        # every pass kind and round shape of its token count.
        quad_len = tl.load(Quad).to(tl.int32)
        quad_group = tl.load(Quad + 1).to(tl.int32)
        m_hi = tl.minimum(m_start + BLOCK_M, ext_len) - 1  # last real token of this tile
        # Visible new-token keys: causal [0, m_hi], the other kinds all of them.
        e_hi = tl.where(kind == 0, m_hi + 1, ext_len)
        i2 = m_idx[:, None]
        for start in range(0, e_hi, BLOCK_N):
            cols = start + offs_n
            c_ok = cols < e_hi
            j2 = cols[None, :]
            # Row i sees key j if j <= i; BLOCK_BIDIRECTIONAL every key; SEED_CAUSAL every key
            # from rows i > 0 (row 0, the seed, stays causal).
            vis = (kind == 1) | (j2 <= i2) | ((kind == 2) & (i2 > 0))
            # QUADRATIC: block keys up to the row's owner (a block row owns itself, a mask row
            # the block token its group follows), and a mask row's own group.
            owner = tl.where(i2 < quad_len, i2, (i2 - quad_len) // quad_group)
            vis_q = (((j2 < quad_len) & (j2 <= owner))
                     | ((i2 >= quad_len) & (j2 >= quad_len) & ((j2 - quad_len) // quad_group == owner)))
            vis = tl.where(kind == 3, vis_q, vis) & c_ok[None, :]
            ktok = ext_start + cols.to(tl.int64)
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(K_new + ktok[:, None] * stride_knt + kvh * stride_knh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V_new + ktok[:, None] * stride_vnt + kvh * stride_vnh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            acc, l_i, m_i = _online_softmax_tile(acc, l_i, m_i, q, k, v, vis, qk_scale,
                                                 DOT_FP32)

    # ---- 3. epilogue. Padding rows (and, for empty splits, every row) have l_i == 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    st_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=st_mask)
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), -1.0e30)
        tl.store(O_part + pid_s * stride_ps + tok[:, None] * stride_pt
                 + head[:, None] * stride_ph + offs_d[None, :], o, mask=st_mask)
        tl.store(Lse_part + pid_s * stride_ls + tok * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _split_merge(
    O_part, Lse_part, O,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, query head): weight each split's normalised output by
    # 2^(lse_s - max lse). Empty splits carry lse = -1e30 and get weight 0.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(Lse_part + offs_s * stride_ls + t * stride_lt + h, mask=s_ok, other=-1.0e30)
    w = tl.math.exp2(lse - tl.max(lse, 0))
    w = tl.where(s_ok, w, 0.0)
    o = tl.load(O_part + offs_s[:, None] * stride_ps + t * stride_pt + h * stride_ph
                + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + t * stride_ot + h * stride_oh + offs_d, res.to(O.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------



def _pick_config(dtype: torch.dtype, head_dim: int, interpret: bool):
    """Fixed (autotune-free) tile configs -> (BLOCK_R rows, BLOCK_N, num_warps, num_stages)."""
    if interpret:
        return 16, 16, 1, 1
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    # 16-bit, D <= 128: the FA-tutorial Hopper/Ampere shape (128 x 64 tiles, 8 warps).
    return 128, 64, 8, 2


def plan_num_splits(base_programs: int, max_prefix_len: int, sm_count: int) -> int:
    """Prefix split count for split-KV: only when the query tiles alone (``base_programs`` =
    query tiles x requests x KV heads) cannot fill ~2 programs per SM and the prefix is long.
    Each split keeps >= 512 prefix keys so the fp32 partial-output traffic stays small next to
    the K/V bytes it reads."""
    target = 2 * sm_count
    if base_programs >= target or max_prefix_len < 1024:
        return 1
    return max(1, min(target // base_programs, max_prefix_len // 512, 64))


def attention_launch_shape(q_dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           batch: int, max_extend_len: int, interpret: bool = False):
    """(query tokens per tile, programs before splitting) the launcher will use (for the bench)."""
    gp = triton.next_power_of_2(num_q_heads // num_kv_heads)
    block_r = max(_pick_config(q_dtype, head_dim, interpret)[0], gp)
    block_m = block_r // gp
    return block_m, triton.cdiv(max_extend_len, block_m) * batch * num_kv_heads


def _as_kind_tensor(mask_kind, batch: int, device) -> torch.Tensor:
    if isinstance(mask_kind, torch.Tensor):
        if mask_kind.dim() == 0:
            kind = mask_kind.to(device=device, dtype=torch.int32).reshape(1)
            return kind.expand(batch).contiguous()
        assert mask_kind.shape == (batch,), "mask_kind tensor must be [B]"
        return mask_kind.to(device=device, dtype=torch.int32).contiguous()
    kind = int(mask_kind)
    assert kind in MASK_KINDS, f"unknown mask kind {kind}"
    return torch.full((batch,), kind, dtype=torch.int32, device=device)


def _as_quad_tensor(quadratic, device) -> torch.Tensor:
    """(L, g) as int32 [2] on the device: a tensor as given (a graph-safe pass's data), else
    made from the tuple ((0, 1) when there is no quadratic round)."""
    if isinstance(quadratic, torch.Tensor):
        assert quadratic.numel() >= 2, "quadratic tensor must hold (L, g)"
        return quadratic[:2].to(device=device, dtype=torch.int32)
    return torch.tensor(tuple(quadratic[:2]) if quadratic else (0, 1), dtype=torch.int32,
                        device=device)


def quadratic_shape(quadratic, extend_len: int) -> Optional[tuple]:
    """(L, g, groups) of a round of `extend_len` tokens from (L, g[, groups]) or an int tensor
    (L, g): a sparse round's extend length says how many groups it has."""
    if quadratic is None:
        return None
    L, g = (int(x) for x in (quadratic.tolist() if isinstance(quadratic, torch.Tensor)
                             else quadratic)[:2])
    return L, g, (extend_len - L) // g


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def structured_attention(
    q, k_new, v_new, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
    extend_start_loc, extend_lens, mask_kind, sm_scale, out=None,
    *, max_extend_len: Optional[int] = None, max_prefix_len: Optional[int] = None,
    num_splits: Optional[int] = None, quadratic: Optional[tuple] = None,
):
    """Structured-mask attention for a ragged extend batch over a token-level KV pool.

    Shapes: q [T, Hq, D]; k_new/v_new [T, Hkv, D]; k_cache/v_cache [num_slots, Hkv, D];
    req_to_token [max_reqs, max_ctx]; req_pool_indices/prefix_lens/extend_start_loc/extend_lens
    [B]; mask_kind an int (one kind for the launch) or a [B] int tensor (per request). Returns out
    [T, Hq, D] in q's dtype. Expects SGLang's dense extend layout (T == sum(extend_lens), each
    request's new tokens at extend_start_loc[b] ..): rows outside every request are not defined.

    Optional host-side hints avoid device->host syncs: ``max_extend_len`` / ``max_prefix_len``
    (SGLang has them on the CPU already); ``num_splits`` forces the prefix split count.
    ``quadratic`` = (L, g[, groups]) or an int tensor holding (L, g): the round layout of
    requests whose kind is QUADRATIC (a sparse round's extend length tells the kernel how many
    groups there are). With ``mask_kind`` and ``quadratic`` as tensors nothing about the pass kind
    is baked into the launch (a CUDA graph of it replays every kind).
    """
    T, Hq, D = q.shape
    Hkv = k_new.shape[1]
    assert Hq % Hkv == 0, "Hq must be a multiple of Hkv"
    assert k_new.shape == (T, Hkv, D) and v_new.shape == (T, Hkv, D)
    assert k_cache.shape[1:] == (Hkv, D) and v_cache.shape[1:] == (Hkv, D)
    assert q.dtype == k_new.dtype == v_new.dtype == k_cache.dtype == v_cache.dtype, \
        "q, k/v new and k/v cache must share a dtype"
    B = req_pool_indices.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    interpret = triton_interpreting() or q.device.type != "cuda"
    BLOCK_R, BLOCK_N, num_warps, num_stages = _pick_config(q.dtype, D, interpret)
    BLOCK_R = max(BLOCK_R, GP)
    BLOCK_M = BLOCK_R // GP
    BLOCK_D = max(16, triton.next_power_of_2(D))

    q, k_new, v_new = _last_dim_contig(q), _last_dim_contig(k_new), _last_dim_contig(v_new)
    k_cache, v_cache = _last_dim_contig(k_cache), _last_dim_contig(v_cache)
    req_to_token = _last_dim_contig(req_to_token)
    kinds = _as_kind_tensor(mask_kind, B, q.device)
    o = out if out.stride(-1) == 1 else torch.empty_like(q)

    if max_extend_len is None:
        max_extend_len = int(extend_lens.max())  # host sync; pass the hint to avoid it
    if max_extend_len <= 0:
        return out
    n_mtiles = triton.cdiv(max_extend_len, BLOCK_M)
    base_programs = n_mtiles * B * Hkv

    if num_splits is None:
        num_splits = 1
        if not interpret:
            if max_prefix_len is None:
                max_prefix_len = int(prefix_lens.max())  # host sync; pass the hint to avoid it
            num_splits = plan_num_splits(base_programs, max_prefix_len, _sm_count(q.device))
    num_splits = max(1, int(num_splits))

    if num_splits > 1:
        o_part = torch.empty((num_splits, T, Hq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, T, Hq), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = o  # unused
    ps = o_part.stride() if num_splits > 1 else (0, 0, 0, 1)
    ls = lse_part.stride() if num_splits > 1 else (0, 0, 1)

    grid = (n_mtiles, B * Hkv, num_splits)
    _structured_attn_fwd[grid](
        q, k_new, v_new, k_cache, v_cache, o, o_part, lse_part,
        req_to_token, req_pool_indices, prefix_lens, extend_start_loc, extend_lens, kinds,
        _as_quad_tensor(quadratic, q.device), float(sm_scale) * _LOG2E, Hkv,
        q.stride(0), q.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1),
        req_to_token.stride(0),
        ps[0], ps[1], ps[2],
        ls[0], ls[1],
        G=G, GP=GP, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_M * GP, BLOCK_N=BLOCK_N, HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        NUM_SPLITS=num_splits, DOT_FP32=(interpret or q.dtype == torch.float32),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _split_merge[(T, Hq)](
            o_part, lse_part, o,
            ps[0], ps[1], ps[2], ls[0], ls[1], o.stride(0), o.stride(1),
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, num_warps=4 if not interpret else 1,
        )
    if o is not out:
        out.copy_(o)
    return out


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------


def build_mask(kind: int, prefix_len: int, extend_len: int, device=None,
               quadratic: Optional[tuple] = None) -> torch.Tensor:
    """Dense bool mask [extend_len, prefix_len + extend_len]; True = query may attend to key."""
    kind = int(kind)
    if kind == QUADRATIC:
        from sglang_nemodiff.quadratic_layout import QuadraticLayout

        layout = QuadraticLayout(*quadratic)
        assert layout.tokens == extend_len, (layout, extend_len)
        return layout.extend_mask(prefix_len, device=device)
    i = torch.arange(extend_len, device=device)[:, None]
    j = torch.arange(extend_len, device=device)[None, :]
    if kind == CAUSAL:
        new = j <= i
    elif kind == BLOCK_BIDIRECTIONAL:
        new = torch.ones(extend_len, extend_len, dtype=torch.bool, device=device)
    elif kind == SEED_CAUSAL:
        new = torch.ones(extend_len, extend_len, dtype=torch.bool, device=device)
        new[0, 1:] = False
    else:
        raise ValueError(f"unknown mask kind {kind}")
    pre = torch.ones(extend_len, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([pre, new], dim=1)


def structured_attention_reference(
    q, k_new, v_new, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
    extend_start_loc, extend_lens, mask_kind, sm_scale, out=None, quadratic=None, **_unused,
):
    """Plain PyTorch: gather the prefix through req_to_token, dense mask, fp32 softmax."""
    T, Hq, D = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    B = req_pool_indices.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if isinstance(mask_kind, torch.Tensor):
        kinds = mask_kind.reshape(-1).tolist()
        if len(kinds) == 1:
            kinds = kinds * B
    else:
        kinds = [int(mask_kind)] * B
    rows = req_pool_indices.tolist()
    pls = prefix_lens.tolist()
    starts = extend_start_loc.tolist()
    els = extend_lens.tolist()
    for b in range(B):
        P, s, E = pls[b], starts[b], els[b]
        if E == 0:
            continue
        slots = req_to_token[rows[b], :P].long()
        k = torch.cat([k_cache[slots], k_new[s:s + E]], 0).float()  # [P+E, Hkv, D]
        v = torch.cat([v_cache[slots], v_new[s:s + E]], 0).float()
        k = k.repeat_interleave(G, dim=1)  # query head h uses KV head h // G
        v = v.repeat_interleave(G, dim=1)
        qb = q[s:s + E].float()
        scores = torch.einsum("ihd,jhd->hij", qb, k) * sm_scale
        mask = build_mask(kinds[b], P, E, device=q.device,
                          quadratic=quadratic_shape(quadratic, E) if kinds[b] == QUADRATIC else None)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[s:s + E] = torch.einsum("hij,jhd->ihd", p, v).to(out.dtype)
    return out
