"""Reference NLD forward: Ministral-3 decoder, YaRN RoPE, Llama-4 query scaling,
untied `diffusion_head`, causal or block-bidirectional attention over a KV cache.

Batch 1, readable over fast. The cache only ever holds committed causal KV: a forward returns the
new tokens' K/V and the caller decides how many of them to keep (`KVCache.append`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The config class (transformers) is imported where a checkpoint is read: the model itself needs
# only torch, so it runs on a machine with torch alone (launch/gpu_forward_bench.py).


def yarn_inv_freq_and_scale(head_dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and cos/sin scale, as in the YaRN paper / HF `_compute_yarn_parameters`."""
    base = float(rope["rope_theta"])
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    extrapolation = 1.0 / base**dims
    if rope.get("rope_type", "yarn") != "yarn":
        return extrapolation.float(), 1.0
    factor = float(rope["factor"])
    original_max = float(rope["original_max_position_embeddings"])

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(float(rope.get("beta_fast", 32)))
    high = correction_dim(float(rope.get("beta_slow", 1)))
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    inv_freq = (extrapolation / factor) * (1 - keep_extrapolated) + extrapolation * keep_extrapolated

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if rope.get("mscale") and rope.get("mscale_all_dim"):
        scale = mscale(float(rope["mscale"])) / mscale(float(rope["mscale_all_dim"]))
    else:
        scale = mscale(1.0)
    return inv_freq.float(), scale * float(rope.get("attn_factor", 1.0))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
    """Neox-style rotation of x [T, H, D] at integer positions [T]."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(x.device)[None, :]
    cos = (freqs.cos() * scale).to(x.dtype)[:, None, :]
    sin = (freqs.sin() * scale).to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def llama4_query_scale(positions: torch.Tensor, beta: float, original_max: int) -> torch.Tensor:
    """`1 + beta * log(1 + floor(pos / original_max))`: identity below `original_max`."""
    return 1 + beta * torch.log1p(torch.floor(positions.to(torch.float32) / original_max))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@dataclass
class KVCache:
    """Per layer [Hkv, L, D] keys and values of committed tokens."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    def __len__(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[1]

    def append(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], count: int | None = None):
        """Keep the first `count` new tokens' KV (all by default)."""
        for layer, (k, v) in enumerate(new_kv):
            k, v = k[:, :count], v[:, :count]
            if layer >= len(self.keys):
                self.keys.append(k)
                self.values.append(v)
            else:
                self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
                self.values[layer] = torch.cat([self.values[layer], v], dim=1)


class NLDReference(nn.Module):
    def __init__(self, config: NemotronLabsDiffusionConfig):
        super().__init__()
        self.config = c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList()
        for _ in range(c.num_hidden_layers):
            layer = nn.Module()
            layer.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
            layer.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
            layer.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
            layer.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
            layer.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
            layer.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
            layer.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
            layer.input_layernorm = nn.Parameter(torch.ones(c.hidden_size))
            layer.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size))
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.diffusion_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:  # converted AR models: the head is the embedding matrix
            self.diffusion_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scale = yarn_inv_freq_and_scale(self.head_dim, c.rope_parameters)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Draft-only LoRA on o_proj: per layer (A [r, in], B [out, r]) and alpha / r.
        self.draft_lora: list | None = None
        self.draft_lora_scale = 0.0

    # ----- loading -----
    def hf_state_dict_names(self) -> dict[str, torch.Tensor]:
        """The real HF tensor names (`encoder.*`, `diffusion_head.weight`) -> parameters."""
        names = {"encoder.embed_tokens.weight": self.embed_tokens.weight,
                 "encoder.norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            names["diffusion_head.weight"] = self.diffusion_head.weight
        for i, layer in enumerate(self.layers):
            p = f"encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names[p + f"self_attn.{proj}.weight"] = getattr(layer, proj).weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[p + f"mlp.{proj}.weight"] = getattr(layer, proj).weight
            names[p + "input_layernorm.weight"] = layer.input_layernorm
            names[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm
        return names

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu", quadratic: bool = False,
                        **config_overrides):
        """`quadratic`: load the draft adapter the quadratic mode runs (checkpoint.adapter_dir)."""
        from safetensors.torch import load_file

        from sglang_nemodiff.config import NemotronLabsDiffusionConfig

        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        raw.pop("model_type", None)
        raw.update(config_overrides)
        with torch.device("meta"):
            model = cls(NemotronLabsDiffusionConfig(**raw))
        state = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(path, name)))
        model = model.to_empty(device=device)
        if model.config.tie_word_embeddings:  # to_empty() made the head its own tensor again
            model.diffusion_head.weight = model.embed_tokens.weight
        for name, param in model.hf_state_dict_names().items():
            if name not in state:
                raise KeyError(f"checkpoint {path} is missing tensor {name}")
            param.data.copy_(state[name])
        model = model.to(dtype)
        # to_empty() left the (non-persistent) RoPE buffer uninitialised: recompute it.
        model.inv_freq, model.rope_scale = yarn_inv_freq_and_scale(
            model.head_dim, model.config.rope_parameters)
        model.inv_freq = model.inv_freq.to(device)
        from sglang_nemodiff.checkpoint import adapter_dir

        lora_dir = adapter_dir(path, quadratic)
        if os.path.isdir(lora_dir):
            model.load_draft_lora(lora_dir)
        return model.eval()

    def load_draft_lora(self, lora_dir: str):
        from safetensors.torch import load_file

        with open(os.path.join(lora_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        weights = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
        self.draft_lora = []
        dtype, device = self.diffusion_head.weight.dtype, self.diffusion_head.weight.device
        for i in range(len(self.layers)):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
            self.draft_lora.append((a.to(device, dtype), b.to(device, dtype)))
        self.draft_lora_scale = cfg["lora_alpha"] / cfg["r"]

    # ----- forward -----
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, causal: bool = True,
                use_draft_lora: bool = False):
        """Logits [T, V] of `input_ids` [T] placed after the cache, and the new tokens' KV.
        A bidirectional pass returns per-slot logits: row j predicts the token at slot j, whatever
        the checkpoint's draft convention (`shift_logits`, see `slot_logits`)."""
        c = self.config
        past = len(cache) if cache is not None else 0
        T = input_ids.shape[0]
        device = input_ids.device
        positions = torch.arange(past, past + T, device=device)
        # the block is causal or open; causal_seed (config.py): the seed row of a bidirectional
        # pass attends causally and runs the base weights.
        seed_causal = c.causal_seed and not causal
        if causal:
            allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        else:
            allowed = torch.ones(T, T, dtype=torch.bool, device=device)
            if seed_causal:
                allowed[0, 1:] = False
        draft_rows = None
        if use_draft_lora:
            draft_rows = torch.ones(T, dtype=torch.bool, device=device)
            if seed_causal:
                draft_rows[0] = False
        logits, new_kv = self.forward_structured(input_ids, cache, positions, allowed, draft_rows)
        if not causal:
            logits = slot_logits(logits.unsqueeze(0), c.shift_logits)[0]
        return logits, new_kv

    @torch.no_grad()
    def forward_structured(self, input_ids: torch.Tensor, cache: KVCache | None,
                           positions: torch.Tensor, allowed: torch.Tensor,
                           draft_rows: torch.Tensor | None = None):
        """The forward for any attention pattern among the new tokens: `positions` [T], `allowed`
        [T, T] (query i may see new token j; the cached prefix is always visible), the draft
        adapter on `draft_rows` [T] (None: nowhere). Raw logits [T, V] (no slot shift)."""
        c = self.config
        past = len(cache) if cache is not None else 0
        T = input_ids.shape[0]
        rope = c.rope_parameters
        q_scale = llama4_query_scale(positions, float(rope.get("llama_4_scaling_beta") or 0.0),
                                     int(rope.get("original_max_position_embeddings", 16384)))
        allowed = torch.cat([torch.ones(T, past, dtype=torch.bool, device=input_ids.device),
                             allowed], 1)
        h = self.embed_tokens(input_ids)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_layernorm, c.rms_norm_eps)
            q = layer.q_proj(x).view(T, self.n_heads, self.head_dim)
            k = layer.k_proj(x).view(T, self.n_kv, self.head_dim)
            v = layer.v_proj(x).view(T, self.n_kv, self.head_dim)
            q = apply_rope(q, positions, self.inv_freq, self.rope_scale)
            k = apply_rope(k, positions, self.inv_freq, self.rope_scale)
            q = q * q_scale.to(q.dtype)[:, None, None]
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
            new_kv.append((k, v))
            if past:
                k = torch.cat([cache.keys[i], k], dim=1)
                v = torch.cat([cache.values[i], v], dim=1)
            group = self.n_heads // self.n_kv
            k = k.repeat_interleave(group, dim=0).float()
            v = v.repeat_interleave(group, dim=0).float()
            scores = torch.einsum("thd,hsd->hts", q.float(), k) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~allowed, float("-inf"))
            attn = torch.einsum("hts,hsd->thd", scores.softmax(-1), v).to(h.dtype)
            attn = attn.reshape(T, self.n_heads * self.head_dim)
            out = layer.o_proj(attn)
            if draft_rows is not None and self.draft_lora is not None:
                a, b = self.draft_lora[i]
                delta = (attn @ a.t() @ b.t()) * self.draft_lora_scale
                out = out + delta * draft_rows[:, None].to(delta.dtype)
            h = h + out
            x = rms_norm(h, layer.post_attention_layernorm, c.rms_norm_eps)
            h = h + layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))
        logits = self.diffusion_head(rms_norm(h, self.norm, c.rms_norm_eps)).float()
        return logits, new_kv


def slot_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Bidirectional-pass logits [bs, B, V] as per-slot predictions. With the shifted convention
    (converted AR models) the output at slot j predicts slot j + 1: slot j's prediction is row
    j - 1. Slot 0 (the committed seed) is never predicted; it keeps row 0."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
