"""`--attention-backend nemodiff`: SGLang's torch_native backend with the structured-mask kernel
for every extend pass.

Decode batches take TorchNativeAttnBackend's path unchanged. Extend batches (prefill chunks and
DLLM_EXTEND block passes) write the new K/V into the pool as the parent does, then run
`structured_attention` over SGLang's paged pool: the prefix of request b is read through
`req_to_token[req_pool_indices[b], :extend_prefix_lens[b]]`, the new tokens from `k`/`v` directly.
Mask kind per layer: CAUSAL for DECODER layers (the model's `attn`), BLOCK_BIDIRECTIONAL for
ENCODER_ONLY layers (the model's `attn_bidir`: the block sees the cached prefix and all of itself),
SEED_CAUSAL for an `attn_bidir` the model marked `nemodiff_seed_causal` (config.py: causal_seed).

Where it runs: on CUDA the Triton kernel; on CPU the Triton kernel only under `TRITON_INTERPRET=1`
(Triton has no CPU backend otherwise), else `structured_attention_reference` (plain PyTorch).
QUADRATIC for the `attn_bidir` layers of a quadratic round (the layout the model hands over on
the batch: quadratic_layout.py).
Layers the kernel does not cover (cross attention, sliding window, different K/V head dims, a KV
cache dtype other than the query's) fall back to the parent's SDPA path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

from sglang_nemodiff.kernels.dispatch import triton_interpreting
from sglang_nemodiff.kernels.structured_attention import (
    BLOCK_BIDIRECTIONAL,
    CAUSAL,
    QUADRATIC,
    SEED_CAUSAL,
    structured_attention,
    structured_attention_reference,
)

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BACKEND_NAME = "nemodiff"


class _ExtendMetadata:
    """Per-forward extend layout, shared by all layers of one forward."""

    __slots__ = ("extend_seq_lens", "extend_start_loc", "max_extend_len", "max_prefix_len")

    def __init__(self, forward_batch: ForwardBatch):
        seq_lens = forward_batch.extend_seq_lens
        self.extend_seq_lens = seq_lens  # identifies the batch (copies share the tensor)
        start = forward_batch.extend_start_loc
        if start is None or start.shape[0] != seq_lens.shape[0]:
            start = torch.cumsum(seq_lens, 0) - seq_lens  # exclusive cumsum
        self.extend_start_loc = start
        ext_cpu = forward_batch.extend_seq_lens_cpu
        pre_cpu = forward_batch.extend_prefix_lens_cpu
        # Host-side maxima (None makes the kernel sync to compute them).
        self.max_extend_len = max(ext_cpu) if ext_cpu else None
        self.max_prefix_len = max(pre_cpu) if pre_cpu else None


class NemodiffAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner: ModelRunner):
        super().__init__(model_runner)
        self.use_triton = self.device_is_cuda(model_runner) or triton_interpreting()
        self.attention = structured_attention if self.use_triton else structured_attention_reference
        self.extend_metadata: Optional[_ExtendMetadata] = None
        logger.info("nemodiff attention backend: extend passes run %s",
                    "the Triton structured-attention kernel"
                    + (" (TRITON_INTERPRET=1)" if triton_interpreting() else "")
                    if self.use_triton else "structured_attention_reference (PyTorch)")

    @staticmethod
    def device_is_cuda(model_runner) -> bool:
        device = model_runner.device
        return torch.device(device).type == "cuda" if device is not None else False

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        if mode.is_decode() or mode.is_idle() or forward_batch.extend_seq_lens is None:
            self.extend_metadata = None
        else:
            self.extend_metadata = _ExtendMetadata(forward_batch)

    @staticmethod
    def quadratic_layout(layer: RadixAttention, forward_batch: ForwardBatch):
        """A quadratic round's layout, which its bidirectional layers draw (model.py)."""
        if layer.attn_type != AttentionType.ENCODER_ONLY:
            return None
        return getattr(forward_batch, "nemodiff_layout", None)

    @classmethod
    def mask_kind(cls, layer: RadixAttention, forward_batch: ForwardBatch) -> int:
        if cls.quadratic_layout(layer, forward_batch) is not None:
            return QUADRATIC
        if layer.attn_type == AttentionType.ENCODER_ONLY:
            return SEED_CAUSAL if getattr(layer, "nemodiff_seed_causal", False) else BLOCK_BIDIRECTIONAL
        if (layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL
                and forward_batch.forward_mode.is_dllm_extend()):
            return BLOCK_BIDIRECTIONAL  # as SGLang's triton backend treats it
        return CAUSAL

    def _kernel_covers(self, q, k, v, layer: RadixAttention) -> bool:
        if k is None or v is None or layer.is_cross_attention:
            return False
        if layer.qk_head_dim != layer.v_head_dim:
            return False
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            return False
        if self.use_sliding_window_kv_pool:
            return False
        return self.token_to_kv_pool.get_key_buffer(layer.layer_id).dtype == q.dtype

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache=True):
        if (forward_batch.extend_seq_lens is None or forward_batch.extend_prefix_lens is None
                or not self._kernel_covers(q, k, v, layer)):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        meta = self.extend_metadata
        if meta is None or meta.extend_seq_lens is not forward_batch.extend_seq_lens:
            # A caller that skipped init_forward_metadata for this batch.
            meta = self.extend_metadata = _ExtendMetadata(forward_batch)

        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)

        o = torch.empty_like(q)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        layout = self.quadratic_layout(layer, forward_batch)
        self.attention(
            q_,
            k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
            v.view(-1, layer.tp_v_head_num, layer.v_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            forward_batch.extend_prefix_lens,
            meta.extend_start_loc,
            forward_batch.extend_seq_lens,
            self.mask_kind(layer, forward_batch),
            layer.scaling,
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            max_extend_len=meta.max_extend_len,
            max_prefix_len=meta.max_prefix_len,
            quadratic=(layout.block_len, layout.group, layout.groups) if layout is not None else None,
        )
        return o
