"""`NemotronLabsDiffusionModel` for SGLang: the NLD architecture and its two attention views.

Ministral-3 decoder on SGLang's parallel layers (so `--tp N` shards it), YaRN RoPE and Llama-4 query
scaling read from `rope_parameters`, untied `diffusion_head`, real HF tensor names (`encoder.*`).

Each layer owns two RadixAttention views of one KV layer: `attn` (causal) and `attn_bidir`
(ENCODER_ONLY: the block sees the cached prefix and all of itself). A forward is causal unless it
is a DLLM_EXTEND batch and the algorithm has not asked for a causal pass. Algorithms choose per
forward through `model.pass_options` (shared by all layers; SGLang may hand the model a copy of
the ForwardBatch, so a flag on the batch would not reach it). The draft-only LoRA on `o_proj`
runs when `pass_options.draft_lora` is set.

With `causal_seed` (config.py) `attn_bidir` is marked `nemodiff_seed_causal`: the attention
backends (attention_backend.py, patches/torch_native_extend.py) keep each block's first row causal,
and the draft LoRA skips those rows (`pass_options.base_rows`), so the seed runs exactly as in a
causal pass while the masks see it.

A quadratic round's one forward (`pass_options.layout`, quadratic_layout.py) runs `attn_bidir`
with the round's pattern, which the model hands the attention backends on the batch it forwards
(`forward_batch.nemodiff_layout`): block rows causal, each mask group over its block prefix and
itself; the draft LoRA on the mask rows only (the block rows' logits are AR's); its logits are
returned per row as computed (no slot shift: the algorithm reads block and group rows apart).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel

from sglang_nemodiff.checkpoint import expected_tensor_shapes
from sglang_nemodiff.reference.model import slot_logits

logger = logging.getLogger(__name__)

LORA_DIR = "linear_spec_lora"


class PassOptions:
    """What the next forward should do; set by the algorithms around `model_runner.forward`."""

    def __init__(self, ar_mode: bool = False):
        self.ar_mode = ar_mode  # the checkpoint's `ar_mode` flag: every pass causal
        self.causal: Optional[bool] = None  # None: causal unless a DLLM_EXTEND batch
        self.draft_lora = False
        # A quadratic round's layout (quadratic_layout.py): its one forward is of that kind.
        self.layout = None
        # Draft passes: [T] bool, True on rows that run the base weights (a causal_seed model's
        # block seeds; a quadratic round's block rows), set by the model per forward.
        self.base_rows: Optional[torch.Tensor] = None

    def uses_causal_attention(self, forward_batch: ForwardBatch) -> bool:
        if self.ar_mode:
            return True
        if self.causal is not None:
            return self.causal
        return not forward_batch.forward_mode.is_dllm_extend()

    def kind(self, forward_batch: ForwardBatch) -> str:
        """The pass kind the next forward runs: "causal", "bidirectional", "draft"
        (bidirectional with the draft LoRA) or "quadratic"."""
        if self.uses_causal_attention(forward_batch):
            return "causal"
        if self.layout is not None:
            return "quadratic"
        return "draft" if self.draft_lora else "bidirectional"


class GraphPassGuard:
    """A CUDA graph freezes the pass kind (attention pattern, draft LoRA) taken when it was
    captured; a replay under another kind would silently compute the wrong pass. The model
    records the kind per forward mode at capture; `check` (called before every replay, see
    patches/cuda_graph_guard.py) raises if a forward asks for another kind. The diffusion modes
    run without graphs (server_args.py), so this only fires if graphs are forced back on."""

    def __init__(self):
        self.captured: dict = {}

    def record(self, forward_mode, kind: str) -> None:
        self.captured[forward_mode] = kind

    def check(self, forward_mode, kind: str) -> None:
        captured = self.captured.get(forward_mode)
        if captured is not None and captured != kind:
            raise RuntimeError(
                f"A CUDA graph captured for a {captured} {forward_mode.name} pass would be replayed "
                f"for a {kind} pass; the NLD diffusion modes must run without CUDA graphs "
                "(sglang_nemodiff disables them for --algorithm fastdiffuser/linearspec/quadratic).")


def capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


SEED_CAUSAL_BACKENDS = ("torch_native", "nemodiff")


def check_seed_causal_backend() -> None:
    """A causal_seed checkpoint's draft pass needs a per-row mask only these backends draw; any
    other would run the seed bidirectionally and silently degrade the drafts."""
    from sglang.srt.runtime_context import attention_backends

    try:
        chosen = {b for b in attention_backends() if b}
    except (ValueError, AttributeError):  # no server context (unit tests build the model bare)
        return
    unsupported = sorted(chosen - set(SEED_CAUSAL_BACKENDS))
    if unsupported:
        raise ValueError(f"This checkpoint sets causal_seed (its draft adapter runs the block's seed "
                         f"causally); attention backend {unsupported[0]!r} cannot draw that mask: "
                         f"use --attention-backend {' or '.join(SEED_CAUSAL_BACKENDS)}")


class NLDAttention(nn.Module):
    def __init__(self, config, layer_id: int, pass_options: PassOptions, quant_config=None,
                 prefix: str = ""):
        super().__init__()
        self.pass_options = pass_options
        tp_size = get_parallel().tp_size
        self.total_heads = config.num_attention_heads
        self.total_kv_heads = config.num_key_value_heads
        assert self.total_heads % tp_size == 0, "num_attention_heads must divide by --tp"
        self.num_heads = self.total_heads // tp_size
        self.num_kv_heads = max(1, self.total_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        rope = config.rope_parameters
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.total_heads,
                                          self.total_kv_heads, bias=False, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_heads * self.head_dim, config.hidden_size,
                                        bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        # SGLang's YaRN takes the original context as its max_position (as ministral3.py does),
        # but read it from rope_parameters: ministral3.py falls back to 16384 silently.
        self.original_max = int(rope.get("original_max_position_embeddings",
                                         config.max_position_embeddings))
        self.rotary_emb = get_rope(self.head_dim, rotary_dim=self.head_dim,
                                   max_position=self.original_max,
                                   base=float(rope["rope_theta"]),
                                   rope_scaling=rope if rope.get("rope_type") != "default" else None,
                                   is_neox_style=True)
        self.llama_4_beta = float(rope.get("llama_4_scaling_beta") or 0.0)
        scaling = self.head_dim**-0.5
        common = dict(num_kv_heads=self.num_kv_heads, layer_id=layer_id, quant_config=quant_config)
        self.attn = RadixAttention(self.num_heads, self.head_dim, scaling, prefix=f"{prefix}.attn",
                                   **common)
        self.attn_bidir = RadixAttention(self.num_heads, self.head_dim, scaling,
                                         attn_type=AttentionType.ENCODER_ONLY,
                                         prefix=f"{prefix}.attn_bidir", **common)
        self.attn_bidir.nemodiff_seed_causal = bool(getattr(config, "causal_seed", False))
        self.draft_lora_a: Optional[RowParallelLinear] = None  # set by load_draft_lora
        self.draft_lora_b: Optional[ReplicatedLinear] = None
        self.draft_lora_scale = 0.0
        self.draft_o_proj: Optional[RowParallelLinear] = None  # o_proj + LoRA merged (merge_draft_lora)

    def merge_draft_lora(self) -> None:
        """Fold the draft LoRA into a second o_proj, W + scale * B @ A (this rank's shard: A is
        split like W's input, B replicated), when the low-rank path is not much cheaper than a full
        matmul: it then costs two matmuls and an add per layer for no saving (rank 128 on the
        bundled model's 256-wide o_proj made its draft pass 22% dearer than the verify pass)."""
        w = self.o_proj.weight
        merged = w.float() + self.draft_lora_scale * (self.draft_lora_b.weight.float()
                                                      @ self.draft_lora_a.weight.float())
        draft = copy.copy(self.o_proj)  # same shard and TP group (a process group cannot be deep-copied)
        draft._parameters = dict(draft._parameters)
        draft.weight = nn.Parameter(merged.to(w.dtype), requires_grad=False)
        self.draft_o_proj = draft
        self.draft_lora_a = self.draft_lora_b = None

    def forward(self, positions, hidden_states, forward_batch: ForwardBatch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.llama_4_beta:
            # Llama-4 query scaling: identity below original_max_position_embeddings.
            scale = 1 + self.llama_4_beta * torch.log1p(
                torch.floor(positions.to(torch.float32) / self.original_max))
            q = (q.view(-1, self.num_heads, self.head_dim) * scale.to(q.dtype)[:, None, None]
                 ).view(-1, self.q_size)
        attn = self.attn if self.pass_options.uses_causal_attention(forward_batch) else self.attn_bidir
        attn_out = attn(q, k, v, forward_batch)
        draft = self.pass_options.draft_lora
        base_rows = self.pass_options.base_rows if draft else None
        out, _ = (self.draft_o_proj if draft and self.draft_o_proj is not None else self.o_proj)(attn_out)
        if draft and self.draft_o_proj is not None and base_rows is not None:
            base, _ = self.o_proj(attn_out[base_rows])  # these rows run the base weights
            out[base_rows] = base
        if self.draft_lora_a is not None and draft:
            low_rank, _ = self.draft_lora_a(attn_out)
            delta, _ = self.draft_lora_b(low_rank)
            if base_rows is not None:
                delta = delta.masked_fill(base_rows[:, None], 0.0)
            out = out + delta * self.draft_lora_scale
        return out


class NLDMLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Unsupported activation {config.hidden_act!r}: NLD uses silu")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size,
                                                       [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class NLDDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, pass_options: PassOptions, quant_config=None,
                 prefix: str = ""):
        super().__init__()
        self.self_attn = NLDAttention(config, layer_id, pass_options, quant_config,
                                      f"{prefix}.self_attn")
        self.mlp = NLDMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class NLDEncoder(nn.Module):
    """The decoder stack; named `encoder` in the real checkpoints."""

    def __init__(self, config, pass_options: PassOptions, quant_config=None, prefix: str = "encoder"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            NLDDecoderLayer(config, i, pass_options, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, forward_batch, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class NemotronLabsDiffusionModel(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.pass_options = PassOptions(ar_mode=bool(getattr(config, "ar_mode", False)))
        if getattr(config, "causal_seed", False) and not self.pass_options.ar_mode:
            check_seed_causal_backend()
        self.graph_guard = GraphPassGuard()
        self.encoder = NLDEncoder(config, self.pass_options, quant_config)
        if getattr(config, "tie_word_embeddings", False):
            # Converted AR models (tools/convert.py): the head is the embedding matrix.
            self.diffusion_head = self.encoder.embed_tokens
        else:
            self.diffusion_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                                 quant_config=quant_config, prefix="diffusion_head")
        # All positions' logits in DLLM_EXTEND batches, the last position's otherwise.
        self.logits_processor = LogitsProcessor(config, return_full_logits=True)

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch: ForwardBatch, input_embeds=None, **kwargs):
        if capturing_cuda_graph():
            self.graph_guard.record(forward_batch.forward_mode, self.pass_options.kind(forward_batch))
        options = self.pass_options
        causal = options.uses_causal_attention(forward_batch)
        quadratic = options.layout if not causal else None
        if quadratic is not None:
            # Every request's round has the layout's T rows; the block rows run the base weights.
            _, _, adapter_rows = quadratic.tensors(input_ids.device)
            options.base_rows = ~adapter_rows.repeat(forward_batch.batch_size)
        elif self.config.causal_seed and not causal:
            # Each request's block starts at a multiple of B (DLLM_EXTEND blocks are uniform).
            block = input_ids.numel() // forward_batch.batch_size
            options.base_rows = torch.arange(input_ids.numel(), device=input_ids.device) % block == 0
        forward_batch.nemodiff_layout = quadratic  # the attention backends draw its pattern
        try:
            hidden = self.encoder(input_ids, positions, forward_batch, input_embeds)
        finally:
            options.base_rows = None
            forward_batch.nemodiff_layout = None
        out = self.logits_processor(input_ids, hidden, self.diffusion_head, forward_batch)
        if (self.config.shift_logits and out.full_logits is not None
                and not causal and quadratic is None):
            # Per-slot logits whatever the draft convention (config.py: shift_logits): the
            # algorithms read row j as the prediction for block slot j.
            bs = forward_batch.batch_size
            full = out.full_logits.view(bs, -1, out.full_logits.shape[-1])
            out.full_logits = slot_logits(full, True).reshape(out.full_logits.shape)
        return out

    # ----- weights -----
    _STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", 0),
                "up_proj": ("gate_up_proj", 1)}

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]):
        expected = expected_tensor_shapes(self.config)
        params = dict(self.named_parameters())
        seen = set()
        for name, tensor in weights:
            if name not in expected:
                logger.warning("Ignoring unexpected tensor %s in the checkpoint", name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"Checkpoint tensor {name} has shape {list(tensor.shape)}, "
                                 f"expected {list(expected[name])} from config.json")
            seen.add(name)
            module_name, _, leaf = name.rpartition(".")
            owner, _, proj = module_name.rpartition(".")
            if proj in self._STACKED:
                fused, shard = self._STACKED[proj]
                param = params[f"{owner}.{fused}.{leaf}"]
                param.weight_loader(param, tensor, shard)
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ValueError(f"Checkpoint is missing tensor {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.load_draft_lora()

    def load_draft_lora(self):
        """Attach `linear_spec_lora/` (PEFT, o_proj) for the draft pass, if configured/present."""
        from sglang_nemodiff.settings import current_settings

        settings = current_settings()
        root = getattr(self.config, "_name_or_path", None) or ""
        lora_dir = settings.lora_path or os.path.join(root, LORA_DIR)
        if not settings.use_lora:
            return
        if not os.path.isdir(lora_dir):
            if settings.lora_path:
                raise FileNotFoundError(f"lora_path {settings.lora_path} is not a directory")
            return
        from safetensors.torch import load_file

        with open(os.path.join(lora_dir, "adapter_config.json")) as f:
            adapter = json.load(f)
        if set(adapter.get("target_modules", [])) != {"o_proj"}:
            raise ValueError(f"{lora_dir}: only o_proj LoRA adapters are supported, "
                             f"got target_modules={adapter.get('target_modules')}")
        rank, scale = adapter["r"], adapter["lora_alpha"] / adapter["r"]
        tensors = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
        dtype = self.diffusion_head.weight.dtype
        # Every layer's o_proj shard has the same shape: one decision for all of them.
        hidden, width_shard = self.encoder.layers[0].self_attn.o_proj.weight.shape
        merge = self.quant_config is None and rank * (width_shard + hidden) >= width_shard * hidden // 4
        for i, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            for part in ("lora_A", "lora_B"):
                if f"{key}.{part}.weight" not in tensors:
                    raise ValueError(f"{lora_dir}: missing tensor {key}.{part}.weight")
            width = attn.total_heads * attn.head_dim
            # A is split over the (tensor-parallel) attention output like o_proj; B is replicated.
            attn.draft_lora_a = RowParallelLinear(width, rank, bias=False, params_dtype=dtype,
                                                  prefix=f"{key}.lora_A")
            attn.draft_lora_b = ReplicatedLinear(rank, self.config.hidden_size, bias=False,
                                                 params_dtype=dtype, prefix=f"{key}.lora_B")
            device = self.diffusion_head.weight.device
            attn.draft_lora_a.to(device)
            attn.draft_lora_b.to(device)
            a = attn.draft_lora_a.weight
            a.weight_loader(a, tensors[f"{key}.lora_A.weight"].to(dtype))
            b = attn.draft_lora_b.weight
            b.weight_loader(b, tensors[f"{key}.lora_B.weight"].to(dtype))
            attn.draft_lora_scale = scale
            if merge:
                attn.merge_draft_lora()
        logger.info("Loaded draft-only LoRA from %s (r=%d, alpha/r=%.1f%s)", lora_dir, rank, scale,
                    ", merged into a draft o_proj" if merge else "")


EntryClass = [NemotronLabsDiffusionModel]
