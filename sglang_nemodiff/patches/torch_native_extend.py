"""Extend attention of SGLang's `torch_native` backend without the padded query, in the diffusion
modes. Stock SGLang 0.5.23 pads each request's extend queries to the whole sequence
(`per_req_query_redudant`: L x L scores) so it can use SDPA's `is_causal`; a block round extends
B tokens after a long cached context, so it computed L x L scores per request per layer where
B x L are needed (the bundled model at concurrency 8: 65% of the server's time in this
function, and an AR step taken as a 1-token block ran at 0.68x AR decode). Here each request's
B queries attend over its L keys directly, with an explicit causal mask when the layer is causal
(query i sees keys up to prefix + i) and none when it is bidirectional. Same math, rows computed
once. AR mode keeps the stock function (its output is the accuracy reference).

The bidirectional layers of a seed-causal pass (config.py: causal_seed) keep their first query
row (the block's seed) causal, and those of a quadratic round (quadratic_layout.py) draw its
pattern (block rows causal, each mask group over its block prefix and itself): `forward_extend`
is wrapped to hand the pass kind the model put on the batch (pass_kind.py) to the extend
function for the duration of the call. (Eager forwards only: graph-safe ones need the nemodiff
backend.)"""

from __future__ import annotations

import functools

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.kernels.structured_attention import QUADRATIC, SEED_CAUSAL, build_mask

TARGETS = ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
           "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend")


@functools.lru_cache(maxsize=1)  # one server per process: its algorithm never changes
def _diffusion_server() -> bool:
    try:
        from sglang.srt.runtime_context import get_exec

        algorithm = get_exec().dllm.dllm_algorithm
    except (ImportError, ValueError, AttributeError):
        return False
    from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

    return is_nemodiff_algorithm(algorithm)


def run_sdpa_forward_extend(original, backend, query, output, k_cache, v_cache, req_to_token,
                            req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                            encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                            is_cross_attn=False, sliding_window_size=None):
    if (encoder_lens is not None or is_cross_attn or (sliding_window_size is not None and sliding_window_size > -1)
            or not _diffusion_server()):
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                        seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=encoder_lens,
                        scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                        is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    return sdpa_extend(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                       extend_prefix_lens, extend_seq_lens, scaling, enable_gqa, causal,
                       seed_causal=getattr(backend, "_nemodiff_seed_causal", False),
                       layout=getattr(backend, "_nemodiff_layout", None))


def forward_extend(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True):
    from sglang.srt.layers.radix_attention import AttentionType

    kind = getattr(forward_batch, "nemodiff_kind", None)  # the eager pass kind (model.py)
    if kind is None or layer.attn_type != AttentionType.ENCODER_ONLY or kind.mask not in (
            SEED_CAUSAL, QUADRATIC):
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache)
    backend._nemodiff_seed_causal, backend._nemodiff_layout = kind.mask == SEED_CAUSAL, kind.layout
    try:
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache)
    finally:
        backend._nemodiff_seed_causal, backend._nemodiff_layout = False, None


def sdpa_extend(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, scaling=None, enable_gqa=False, causal=False,
                seed_causal=False, layout=None):
    """Each request's extend queries [q_len] over its keys [kv_len] (prefix + extend);
    `seed_causal` (a bidirectional pass only): query 0 sees the prefix and itself; `layout` (a
    bidirectional pass only): a quadratic round's pattern."""
    query = query.movedim(0, query.dim() - 2)  # [H, tokens, D]
    start_q = 0
    for seq_idx, (q_len, prefix, kv_len) in enumerate(
            zip(extend_seq_lens.tolist(), extend_prefix_lens.tolist(), seq_lens.tolist())):
        end_q = start_q + q_len
        tokens = req_to_token[req_pool_indices[seq_idx], :kv_len]
        key = k_cache[tokens].movedim(0, query.dim() - 2)
        value = v_cache[tokens].movedim(0, query.dim() - 2)
        per_req_query = query[:, start_q:end_q, :]
        if key.dtype != per_req_query.dtype:
            key, value = key.to(per_req_query.dtype), value.to(per_req_query.dtype)
        mask = None
        if causal and q_len > 1:  # one query (an AR step, B = 1) sees every key: no mask
            q_pos = torch.arange(prefix, prefix + q_len, device=query.device)
            mask = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
        elif layout is not None:
            assert q_len == layout.tokens, (q_len, layout)
            mask = layout.extend_mask(prefix, device=query.device)
        elif seed_causal and q_len > 1:  # the kernels' own definition of the pattern
            mask = build_mask(SEED_CAUSAL, prefix, q_len, device=query.device)
        out = scaled_dot_product_attention(per_req_query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                           attn_mask=mask, enable_gqa=enable_gqa, scale=scaling)
        output[start_q:end_q] = out.squeeze(0).movedim(query.dim() - 2, 0)
        start_q = end_q
    return output


def apply() -> None:
    HookRegistry.register(TARGETS[0], run_sdpa_forward_extend, HookType.AROUND)
    HookRegistry.register(TARGETS[1], forward_extend, HookType.AROUND)
