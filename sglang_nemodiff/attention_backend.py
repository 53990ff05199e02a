"""`--attention-backend nemodiff`: SGLang's torch_native backend with the structured-mask kernel
for every extend pass.

Decode batches take TorchNativeAttnBackend's path unchanged. Extend batches (prefill chunks and
DLLM_EXTEND block passes) write the new K/V into the pool as the parent does, then run
`structured_attention` over SGLang's paged pool: the prefix of request b is read through
`req_to_token[req_pool_indices[b], :extend_prefix_lens[b]]`, the new tokens from `k`/`v` directly.
The mask kind: a graph-safe forward's pass data (`forward_batch.nemodiff_pass`, a tensor the
kernel reads, so a captured launch serves every pass kind), else the eager forward's pass kind
(`forward_batch.nemodiff_kind`: CAUSAL, BLOCK_BIDIRECTIONAL, SEED_CAUSAL or QUADRATIC with its
layout; pass_kind.py), else the layer's type (DECODER causal, ENCODER_ONLY block-bidirectional).
The kernel runs as one custom operator (`nemodiff::extend_attention`), so torch.compile sees
one node.

Where it runs: on CUDA the Triton kernel; on CPU the Triton kernel only under `TRITON_INTERPRET=1`
(Triton has no CPU backend otherwise), else `structured_attention_reference` (plain PyTorch).
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
    structured_attention,
    structured_attention_reference,
)

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BACKEND_NAME = "nemodiff"


class _ExtendMetadata:
    """Per-forward extend layout, shared by all layers of one forward: an eager batch's, or a
    captured graph's (`graph`: static buffers the graph reads, refreshed in place per replay)."""

    __slots__ = ("extend_seq_lens", "prefix_lens", "extend_start_loc", "max_extend_len",
                 "max_prefix_len", "graph")

    def __init__(self, forward_batch: Optional[ForwardBatch] = None):
        self.graph = False
        if forward_batch is None:
            return
        seq_lens = forward_batch.extend_seq_lens
        self.extend_seq_lens = seq_lens  # identifies the batch (copies share the tensor)
        self.prefix_lens = forward_batch.extend_prefix_lens
        start = forward_batch.extend_start_loc
        if start is None or start.shape[0] != seq_lens.shape[0]:
            start = torch.cumsum(seq_lens, 0) - seq_lens  # exclusive cumsum
        self.extend_start_loc = start
        ext_cpu = forward_batch.extend_seq_lens_cpu
        pre_cpu = forward_batch.extend_prefix_lens_cpu
        # Host-side maxima (None makes the kernel sync to compute them).
        self.max_extend_len = max(ext_cpu) if ext_cpu else None
        self.max_prefix_len = max(pre_cpu) if pre_cpu else None

    @classmethod
    def for_graph(cls, buffers: dict, batch: int, tokens_per_request: int, max_context: int):
        """A graph's DLLM_EXTEND layout (every request extends tokens_per_request tokens): views
        of the backend's graph buffers; the prefix lengths are written inside the graph."""
        meta = cls()
        meta.graph = True
        meta.extend_seq_lens = buffers["extend_lens"][:batch]
        meta.prefix_lens = buffers["prefix_lens"][:batch]
        meta.extend_start_loc = buffers["start_loc"][:batch]
        meta.max_extend_len = tokens_per_request
        meta.max_prefix_len = max_context  # plans the prefix split for the longest context
        return meta


@torch.library.custom_op("nemodiff::extend_attention", mutates_args=("out",))
def extend_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                     extend_start_loc: torch.Tensor, extend_lens: torch.Tensor,
                     kinds: torch.Tensor, quad: torch.Tensor, sm_scale: float, out: torch.Tensor,
                     max_extend_len: Optional[int], max_prefix_len: Optional[int],
                     use_triton: bool) -> None:
    """The extend attention as one opaque operator: torch.compile (which must not trace the
    reference's per-request loop) sees one node whose pass kind is its `kinds`/`quad` inputs."""
    attention = structured_attention if use_triton else structured_attention_reference
    attention(q, k_new, v_new, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
              extend_start_loc, extend_lens, kinds, sm_scale, out=out,
              max_extend_len=max_extend_len, max_prefix_len=max_prefix_len, quadratic=quad)


@extend_attention.register_fake
def _extend_attention_fake(q, k_new, v_new, k_cache, v_cache, req_to_token, req_pool_indices,
                           prefix_lens, extend_start_loc, extend_lens, kinds, quad, sm_scale, out,
                           max_extend_len, max_prefix_len, use_triton) -> None:
    return None


class NemodiffAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner: ModelRunner):
        super().__init__(model_runner)
        self.use_triton = self.device_is_cuda(model_runner) or triton_interpreting()
        self.extend_metadata: Optional[_ExtendMetadata] = None
        self._pass_tensors: dict = {}  # eager kinds' (mask kinds, quadratic) tensors, made once
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
    def mask_kind(layer: RadixAttention, forward_batch: ForwardBatch) -> int:
        """The pattern of an eager forward: its pass kind (model.py puts it on the batch), else
        what the layer's attention type means."""
        kind = getattr(forward_batch, "nemodiff_kind", None)
        if kind is not None:
            return kind.mask
        if layer.attn_type == AttentionType.ENCODER_ONLY:
            return BLOCK_BIDIRECTIONAL
        if (layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL
                and forward_batch.forward_mode.is_dllm_extend()):
            return BLOCK_BIDIRECTIONAL  # as SGLang's triton backend treats it
        return CAUSAL

    def pass_tensors(self, layer: RadixAttention, forward_batch: ForwardBatch, batch: int):
        """(mask kinds [B], quadratic (L, g)) as device tensors. A graph-safe forward's come from
        its pass data (model.py: `forward_batch.nemodiff_pass`, [mask, adapter, L, g]), views
        only, so a captured launch reads each replay's kind; an eager one's from its kind."""
        data = getattr(forward_batch, "nemodiff_pass", None)
        if data is not None and forward_batch.forward_mode.is_dllm_extend():
            return data[:1].expand(batch), data[2:4]
        kind = getattr(forward_batch, "nemodiff_kind", None)
        layout = kind.layout if kind is not None else None
        key = (self.mask_kind(layer, forward_batch), layout.block_len if layout else 0,
               layout.group if layout else 1)
        tensors = self._pass_tensors.get(key)
        if tensors is None:
            device = self.req_to_token_pool.req_to_token.device
            tensors = self._pass_tensors[key] = (
                torch.tensor([key[0]], dtype=torch.int32, device=device),
                torch.tensor(key[1:], dtype=torch.int32, device=device))
        return tensors[0].expand(batch), tensors[1]

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

    # ----- CUDA graphs (graph-safe models only, `cuda_graphs: true`): SGLang's dLLM graph runner
    # captures DLLM_EXTEND batches of a fixed width; the hooks below give the captured kernel
    # launch static layout buffers, and the pass kind comes from the model's pass data.

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        device = self.req_to_token_pool.req_to_token.device
        self.graph_buffers = {name: torch.zeros(max_bs, dtype=torch.int64, device=device)
                              for name in ("extend_lens", "prefix_lens", "start_loc")}

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False):
        """Before a capture or a replay (host side): the graph's layout buffers."""
        mode = forward_batch.forward_mode
        if not mode.is_dllm_extend():
            raise ValueError(f"nemodiff attention backend: no CUDA graph for {mode.name} batches "
                             "(the diffusion modes capture DLLM_EXTEND rounds only)")
        bs = forward_batch.batch_size
        self.extend_metadata = _ExtendMetadata.for_graph(
            self.graph_buffers, bs, forward_batch.input_ids.numel() // bs,
            self.req_to_token_pool.req_to_token.shape[1])

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch):
        """Recorded in the graph: every request extends T tokens after seq_lens - T cached ones."""
        meta = self.extend_metadata
        T, bs = meta.max_extend_len, meta.prefix_lens.shape[0]
        meta.extend_seq_lens.fill_(T)
        torch.mul(torch.arange(bs, device=meta.extend_start_loc.device), T, out=meta.extend_start_loc)
        torch.sub(forward_batch.seq_lens[:bs], T, out=meta.prefix_lens)

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache=True):
        meta = self.extend_metadata
        in_graph = meta is not None and meta.graph
        if not in_graph and (forward_batch.extend_seq_lens is None
                             or forward_batch.extend_prefix_lens is None
                             or not self._kernel_covers(q, k, v, layer)):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if not in_graph and (meta is None or meta.extend_seq_lens is not forward_batch.extend_seq_lens):
            # A caller that skipped init_forward_metadata for this batch.
            meta = self.extend_metadata = _ExtendMetadata(forward_batch)

        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)

        o = torch.empty_like(q)
        batch = forward_batch.req_pool_indices.shape[0]
        kinds, quad = self.pass_tensors(layer, forward_batch, batch)
        torch.ops.nemodiff.extend_attention(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
            v.view(-1, layer.tp_v_head_num, layer.v_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            meta.prefix_lens,
            meta.extend_start_loc,
            meta.extend_seq_lens,
            kinds,
            quad,
            layer.scaling,
            o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            meta.max_extend_len,
            meta.max_prefix_len,
            self.use_triton,
        )
        return o
