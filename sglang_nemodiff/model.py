"""`NemotronLabsDiffusionModel` for SGLang: the NLD architecture and its two attention views.

Ministral-3 decoder on SGLang's parallel layers (so `--tp N` shards it), YaRN RoPE and Llama-4 query
scaling read from `rope_parameters`, untied `diffusion_head`, real HF tensor names (`encoder.*`).

Each layer owns two RadixAttention views of one KV layer: `attn` (causal) and `attn_bidir`
(ENCODER_ONLY). Algorithms set each forward's pass kind (pass_kind.py: the pattern among the
block's tokens, the draft adapter, a quadratic round's shape) through `model.pass_options`
(shared by all layers; SGLang may hand the model a copy of the ForwardBatch, so a flag on the
batch would not reach it); a forward is causal unless it is a DLLM_EXTEND batch and the
algorithm has not asked for a causal pass.

Two ways to run a DLLM_EXTEND forward, decided once at load:
- eager (default): the kind chooses in Python: `attn` for causal passes, else `attn_bidir`, whose
  pattern the attention backends read from the kind on the batch (`forward_batch.nemodiff_kind`:
  block-bidirectional; seed-causal on a `causal_seed` checkpoint, its seed row causal; a
  quadratic round's pattern); the draft adapter only on passes that use it, merged into a second
  o_proj when that is cheaper; the per-slot logits shift of `shift_logits` checkpoints.
- graph-safe (`cuda_graphs: true`): the kind is data (`pass_options.data`, written in place
  before each forward) and nothing in the forward branches on it: `attn_bidir` always, whose
  backend (`nemodiff` only) reads the pattern from that tensor; the unmerged adapter on every
  block pass, scaled per row by 0/1 computed from the tensor; the logits shift a `torch.where`.
  A graph captured for one kind therefore computes every other.
In both, the rows that run the base weights while the adapter is on (a causal_seed seed, a
quadratic round's block rows, whose logits are AR's) come from `pass_kind.adapter_rows`, and a
quadratic round's logits are returned per row as computed (the algorithm reads block and group
rows apart).
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
from sglang_nemodiff.kernels.structured_attention import CAUSAL, QUADRATIC, SEED_CAUSAL
from sglang_nemodiff.pass_kind import PassKind, adapter_rows, shifts_logits
from sglang_nemodiff.reference.model import slot_logits

logger = logging.getLogger(__name__)



def serving_quadratic() -> bool:
    """Whether this SGLang process serves the quadratic mode (False outside a server)."""
    try:
        from sglang.srt.runtime_context import get_exec

        algorithm = get_exec().dllm.dllm_algorithm
    except (ImportError, ValueError, AttributeError):
        return False
    from sglang_nemodiff.algorithms import ALGORITHMS

    return algorithm == ALGORITHMS["quadratic"]


class PassOptions:
    """The pass kind of the next forward (pass_kind.py), set by the algorithms around
    `model_runner.forward` (SGLang may hand the model a copy of the ForwardBatch, so a flag on
    the batch would not reach it). A graph-safe model (`graph_safe`: the algorithm setting
    `cuda_graphs`) also keeps it as data, `data` (int32 [4] on the model's device, written in
    place so a captured graph reads each forward's kind)."""

    def __init__(self, ar_mode: bool = False, causal_seed: bool = False, graph_safe: bool = False):
        self.ar_mode = ar_mode  # the checkpoint's `ar_mode` flag: every pass causal
        self.causal_seed = causal_seed
        self.graph_safe = graph_safe
        self.kind: Optional[PassKind] = None  # None: causal unless a DLLM_EXTEND batch
        self._default = PassKind.resolve(ar_mode, causal_seed=causal_seed)
        # On the default device, which SGLang's loader sets to the model's while it builds it.
        self.data = torch.tensor(self._default.data(), dtype=torch.int32) if graph_safe else None
        self._sources: dict = {}

    def set(self, causal: bool, adapter: bool = False, layout=None) -> PassKind:
        """The kind of an algorithm's pass (PassKind.resolve, with this checkpoint's flags)."""
        return self.set_kind(PassKind.resolve(causal or self.ar_mode, adapter and not self.ar_mode,
                                              None if self.ar_mode else layout, self.causal_seed))

    def set_kind(self, kind: PassKind) -> PassKind:
        self.kind = kind
        self._write(kind)
        return kind

    def clear(self) -> None:
        self.kind = None
        self._write(self._default)

    def _write(self, kind: PassKind) -> None:
        if self.data is None:
            return
        # A device-to-device copy from one tensor per kind (made once): stream-ordered, no host
        # wait (a copy from pageable host memory would wait for the GPU every forward).
        key = tuple(kind.data())
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = torch.tensor(key, dtype=torch.int32, device=self.data.device)
        self.data.copy_(source)

    def resolve(self, forward_batch: ForwardBatch) -> PassKind:
        """The kind the next forward runs."""
        if self.kind is not None:
            return self.kind
        if self.ar_mode or not forward_batch.forward_mode.is_dllm_extend():
            return PassKind(CAUSAL)
        return self._default


class GraphPassGuard:
    """A CUDA graph freezes the pass kind (attention pattern, draft LoRA) taken when it was
    captured; a replay under another kind would silently compute the wrong pass. The model
    records the kind per forward mode at capture; `check` (called before every replay, see
    patches/cuda_graph_guard.py) raises if a forward asks for another kind. The diffusion modes
    run without graphs unless `cuda_graphs: true`, which makes the model graph-safe (its kind
    is data, pass_kind.py) and records nothing here, so this only fires if graphs are forced
    back on for an eager model."""

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
GRAPH_SAFE_BACKENDS = ("nemodiff",)
GRAPH_SAFE_LOG_LINE = "Graph-safe passes: the pass kind is data the forward reads (cuda_graphs: true)"  # reads the pass kind from the pass data (attention_backend.py)


def check_backend(need: str, backends: tuple) -> None:
    """Refuse at load an attention backend that cannot draw what this model's passes need: a
    causal_seed checkpoint's per-row seed mask (else the seed would run bidirectionally and
    silently degrade the drafts), a graph-safe model's pattern read from data."""
    from sglang.srt.runtime_context import attention_backends

    try:
        chosen = {b for b in attention_backends() if b}
    except (ValueError, AttributeError):  # no server context (unit tests build the model bare)
        return
    unsupported = sorted(chosen - set(backends))
    if unsupported:
        raise ValueError(f"{need}; attention backend {unsupported[0]!r} cannot draw that: "
                         f"use --attention-backend {' or '.join(backends)}")


class NLDAttention(nn.Module):
    def __init__(self, config, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
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
        # Draft adapters (load_draft_lora): "draft" for every adapter pass, and in a quadratic
        # server "quadratic" (the checkpoint's quadratic_lora/) for the quadratic rounds' groups.
        self.adapters = nn.ModuleDict()

    def forward(self, positions, hidden_states, forward_batch: ForwardBatch, causal_view: bool,
                adapter: Optional["AdapterRows"]):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.llama_4_beta:
            # Llama-4 query scaling: identity below original_max_position_embeddings.
            scale = 1 + self.llama_4_beta * torch.log1p(
                torch.floor(positions.to(torch.float32) / self.original_max))
            q = (q.view(-1, self.num_heads, self.head_dim) * scale.to(q.dtype)[:, None, None]
                 ).view(-1, self.q_size)
        attn_out = (self.attn if causal_view else self.attn_bidir)(q, k, v, forward_batch)
        if adapter is None or not self.adapters:
            out, _ = self.o_proj(attn_out)
            return out
        quadratic = self.adapters["quadratic"] if "quadratic" in self.adapters else None
        if quadratic is None or adapter.quadratic is False:
            return self.adapters["draft"](attn_out, self.o_proj, adapter.rows, adapter.base)
        if adapter.quadratic is True:
            return quadratic(attn_out, self.o_proj, adapter.rows, adapter.base)
        # Graph-safe with both adapters: `quadratic` is 1.0 / 0.0 from the pass data, both
        # low-rank deltas run and each is scaled by its share (0.0 leaves the other bit-exact).
        out, _ = self.o_proj(attn_out)
        draft = self.adapters["draft"]
        return (out + draft.delta(attn_out) * (adapter.rows * (1.0 - adapter.quadratic))
                + quadratic.delta(attn_out) * (adapter.rows * adapter.quadratic))


class DraftAdapter(nn.Module):
    """One o_proj LoRA of one layer: A split over the (tensor-parallel) attention output like
    o_proj, B replicated; or, merged, a second o_proj W + scale * B @ A."""

    def __init__(self, o_proj, width: int, rank: int, hidden: int, scale: float, dtype, prefix: str):
        super().__init__()
        self.lora_a = RowParallelLinear(width, rank, bias=False, params_dtype=dtype, prefix=f"{prefix}.lora_A")
        self.lora_b = ReplicatedLinear(rank, hidden, bias=False, params_dtype=dtype, prefix=f"{prefix}.lora_B")
        self.scale = scale
        self.merged: Optional[RowParallelLinear] = None

    def merge(self, o_proj) -> None:
        """Fold the LoRA into a second o_proj (this rank's shard), when the low-rank path is not
        much cheaper than a full matmul: it then costs two matmuls and an add per layer for no
        saving (rank 128 on the bundled model's 256-wide o_proj made its draft pass 22% dearer
        than the verify pass)."""
        w = o_proj.weight
        merged = w.float() + self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())
        draft = copy.copy(o_proj)  # same shard and TP group (a process group cannot be deep-copied)
        draft._parameters = dict(draft._parameters)
        draft.weight = nn.Parameter(merged.to(w.dtype), requires_grad=False)
        self.merged = draft
        del self.lora_a, self.lora_b
        self.lora_a = self.lora_b = None

    def delta(self, attn_out):
        low_rank, _ = self.lora_a(attn_out)
        delta, _ = self.lora_b(low_rank)
        return delta * self.scale

    def forward(self, attn_out, o_proj, rows, base):
        if self.merged is not None:  # merged (eager servers only): base rows recomputed
            out, _ = self.merged(attn_out)
            if base is not None:
                out[base] = o_proj(attn_out[base])[0]
            return out
        out, _ = o_proj(attn_out)
        # rows: 1.0 where the adapter runs, 0.0 elsewhere (out + 0.0 is out, bit for bit)
        return out + self.delta(attn_out) * rows


class AdapterRows:
    """Where a forward runs the draft adapter: `rows` [T, 1] (1.0 / 0.0, pass_kind.adapter_rows)
    and, for a merged adapter on an eager server, `base` [T] bool (rows on the base weights) or
    None when every row runs the adapter. `quadratic`: whether the pass is a quadratic round
    (its adapter, when the server holds one): a bool, or in a graph-safe forward a 0-dim
    1.0 / 0.0 tensor from the pass data."""

    __slots__ = ("rows", "base", "quadratic")

    def __init__(self, rows: torch.Tensor, base: Optional[torch.Tensor] = None, quadratic=False):
        self.rows, self.base, self.quadratic = rows, base, quadratic


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
    def __init__(self, config, layer_id: int, quant_config=None, prefix: str = ""):
        super().__init__()
        self.self_attn = NLDAttention(config, layer_id, quant_config,
                                      f"{prefix}.self_attn")
        self.mlp = NLDMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, forward_batch, residual, causal_view=True,
                adapter=None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch, causal_view, adapter)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class NLDEncoder(nn.Module):
    """The decoder stack; named `encoder` in the real checkpoints."""

    def __init__(self, config, quant_config=None, prefix: str = "encoder"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            NLDDecoderLayer(config, i, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, causal_view=True,
                adapter=None):
        hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, forward_batch, residual, causal_view, adapter)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class NemotronLabsDiffusionModel(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        from sglang_nemodiff.settings import current_settings

        ar_mode = bool(getattr(config, "ar_mode", False))
        # Graph-safe passes (pass_kind.py) only where graphs are asked for: they run the draft
        # adapter unmerged on every row of every block pass, which an eager server need not pay.
        self.pass_options = PassOptions(ar_mode, bool(getattr(config, "causal_seed", False)),
                                        graph_safe=current_settings().cuda_graphs and not ar_mode)
        if self.pass_options.graph_safe:
            logger.info(GRAPH_SAFE_LOG_LINE)
            check_backend("cuda_graphs: true (graph-safe passes read the pass kind as data)",
                          GRAPH_SAFE_BACKENDS)
        elif getattr(config, "causal_seed", False) and not ar_mode:
            check_backend("This checkpoint sets causal_seed (its draft adapter runs the block's "
                          "seed causally)", SEED_CAUSAL_BACKENDS)
        self.graph_guard = GraphPassGuard()
        self.encoder = NLDEncoder(config, quant_config)
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
        options = self.pass_options
        kind = options.resolve(forward_batch)
        tokens, bs = input_ids.numel(), forward_batch.batch_size
        if options.graph_safe and forward_batch.forward_mode.is_dllm_extend():
            # The kind as data: nothing below branches on it, so a graph captured for one
            # kind computes every other one (the attention backend reads the same tensor).
            data = options.data
            forward_batch.nemodiff_pass = data
            mask = data[0]
            causal_view = False
            dtype = self.diffusion_head.weight.dtype
            adapter = AdapterRows(adapter_rows(mask, data[1], data[2], tokens, bs, input_ids.device, dtype),
                                  quadratic=(mask == QUADRATIC).to(dtype))
        else:
            if capturing_cuda_graph():
                self.graph_guard.record(forward_batch.forward_mode, kind.name)
            forward_batch.nemodiff_kind = kind  # the attention backends draw its pattern
            mask, causal_view, adapter = kind.mask, kind.causal, None
            if kind.adapter:
                layout = kind.layout
                rows = adapter_rows(kind.mask, True, layout.block_len if layout else 0, tokens, bs,
                                    input_ids.device, self.diffusion_head.weight.dtype)
                base = rows[:, 0] == 0 if kind.mask in (SEED_CAUSAL, QUADRATIC) else None
                adapter = AdapterRows(rows, base, quadratic=kind.mask == QUADRATIC)
        hidden = self.encoder(input_ids, positions, forward_batch, input_embeds, causal_view, adapter)
        out = self.logits_processor(input_ids, hidden, self.diffusion_head, forward_batch)
        shift = shifts_logits(mask, self.config.shift_logits)
        if out.full_logits is not None and shift is not False:
            # Per-slot logits whatever the draft convention (config.py: shift_logits): the
            # algorithms read row j as the prediction for block slot j.
            full = out.full_logits.view(bs, -1, out.full_logits.shape[-1])
            shifted = slot_logits(full, True)
            if isinstance(shift, torch.Tensor):  # graph-safe: the pass data decides
                shifted = torch.where(shift, shifted, full)
            out.full_logits = shifted.reshape(out.full_logits.shape)
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
        """Attach the draft adapters (PEFT, o_proj) if configured/present: `lora_path` for every
        adapter pass, else the checkpoint's `linear_spec_lora/` and, in a quadratic server, its
        `quadratic_lora/` for the quadratic rounds (checkpoint.adapter_dir: one decision with the
        oracle). A quadratic server without one drafts its groups with the LinearSpec adapter; one
        at a fixed block_size runs no LinearSpec round, so it holds the quadratic adapter alone
        (merged, each adapter is a copy of o_proj per layer)."""
        from sglang_nemodiff.checkpoint import adapter_dir
        from sglang_nemodiff.settings import current_settings

        settings = current_settings()
        if not settings.use_lora:
            return
        root = getattr(self.config, "_name_or_path", None) or ""
        if settings.lora_path:
            if not os.path.isdir(settings.lora_path):
                raise FileNotFoundError(f"lora_path {settings.lora_path} is not a directory")
            self._load_adapter("draft", settings.lora_path)
            return
        draft, quadratic = adapter_dir(root), adapter_dir(root, quadratic=True)
        if not serving_quadratic() or quadratic == draft:
            if os.path.isdir(draft):
                self._load_adapter("draft", draft)
        elif settings.block_size == "auto" and os.path.isdir(draft):  # LinearSpec rounds too
            self._load_adapter("draft", draft)
            self._load_adapter("quadratic", quadratic)
        else:  # the quadratic adapter serves every adapter pass
            self._load_adapter("draft", quadratic)

    def _load_adapter(self, name: str, lora_dir: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(lora_dir, "adapter_config.json")) as f:
            adapter = json.load(f)
        if set(adapter.get("target_modules", [])) != {"o_proj"}:
            raise ValueError(f"{lora_dir}: only o_proj LoRA adapters are supported, "
                             f"got target_modules={adapter.get('target_modules')}")
        rank, scale = adapter["r"], adapter["lora_alpha"] / adapter["r"]
        tensors = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
        dtype = self.diffusion_head.weight.dtype
        device = self.diffusion_head.weight.device
        # Every layer's o_proj shard has the same shape: one decision for all of them.
        hidden, width_shard = self.encoder.layers[0].self_attn.o_proj.weight.shape
        merge = (self.quant_config is None and not self.pass_options.graph_safe
                 and rank * (width_shard + hidden) >= width_shard * hidden // 4)
        for i, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            for part in ("lora_A", "lora_B"):
                if f"{key}.{part}.weight" not in tensors:
                    raise ValueError(f"{lora_dir}: missing tensor {key}.{part}.weight")
            module = DraftAdapter(attn.o_proj, attn.total_heads * attn.head_dim, rank,
                                  self.config.hidden_size, scale, dtype, key).to(device)
            a = module.lora_a.weight
            a.weight_loader(a, tensors[f"{key}.lora_A.weight"].to(dtype))
            b = module.lora_b.weight
            b.weight_loader(b, tensors[f"{key}.lora_B.weight"].to(dtype))
            if merge:
                module.merge(attn.o_proj)
            attn.adapters[name] = module
        logger.info("Loaded draft-only LoRA from %s as the %s adapter (r=%d, alpha/r=%.1f%s)", lora_dir,
                    name, rank, scale, ", merged into a draft o_proj" if merge else "")


EntryClass = [NemotronLabsDiffusionModel]
