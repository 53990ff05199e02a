"""Training-side helpers for the bundled NLD model.

* `NLDTrainModel`: a batched NLD forward whose `state_dict()` names are exactly the real HF tensor
  names (`encoder.*`, `diffusion_head.weight`) and which computes the same function as
  `reference.model.NLDReference` (same YaRN RoPE, Llama-4 query scaling, RMSNorm, SiLU MLP).
  One forward takes clean tokens (encoded causally) plus any number of noisy 32-token blocks, each
  attending to the clean tokens before its start and bidirectionally to itself: exactly the
  inference pattern "block-bidirectional attention over the cached causal prefix".
* The corpus: a fixed, sorted selection of Python standard-library source files with a held-out
  split, and generated copy/edit examples (snippet, instruction, snippet restated with a change).
* `heldout_prompt_sets`: the deterministic held-out prompt sets used by `launch/measure_modes.py`
  and the tests.
"""

from __future__ import annotations

import keyword
import math
import os
import random
import re
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sglang_nemodiff.config import NemotronLabsDiffusionConfig
from sglang_nemodiff.reference.model import apply_rope, llama4_query_scale, rms_norm, yarn_inv_freq_and_scale

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Attention(nn.Module):
    def __init__(self, c: NemotronLabsDiffusionConfig):
        super().__init__()
        hd = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: NemotronLabsDiffusionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _Layer(nn.Module):
    def __init__(self, c: NemotronLabsDiffusionConfig):
        super().__init__()
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.input_layernorm = _Norm(c.hidden_size)
        self.post_attention_layernorm = _Norm(c.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, c: NemotronLabsDiffusionConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = _Norm(c.hidden_size)


def block_attention_mask(seq_len: int, block_starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean mask [B, N, N] (True = may attend), N = seq_len + K * block_size.

    Clean tokens 0..seq_len-1 are causal; noisy block k (rows seq_len + k*bs ...) sees the clean
    tokens at positions < block_starts[b, k] and all of its own block, nothing else.
    """
    B, K = block_starts.shape
    N = seq_len + K * block_size
    dev = block_starts.device
    mask = torch.zeros(B, N, N, dtype=torch.bool, device=dev)
    mask[:, :seq_len, :seq_len] = torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev).tril()
    cols = torch.arange(seq_len, device=dev)
    for k in range(K):
        r0 = seq_len + k * block_size
        prefix = cols[None, :] < block_starts[:, k : k + 1]  # [B, S]
        mask[:, r0 : r0 + block_size, :seq_len] = prefix[:, None, :]
        mask[:, r0 : r0 + block_size, r0 : r0 + block_size] = True
    return mask


class NLDTrainModel(nn.Module):
    """Batched NLD forward for training. `state_dict()` keys are the real HF tensor names."""

    def __init__(self, config: NemotronLabsDiffusionConfig):
        super().__init__()
        self.config = c = config
        self.encoder = _Encoder(c)
        self.diffusion_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv_freq, self.rope_scale = yarn_inv_freq_and_scale(c.head_dim, c.rope_parameters)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_weights(self, seed: int = 0, std: float = 0.02):
        gen = torch.Generator().manual_seed(seed)
        n_layers = self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, V] (fp32) of `input_ids` [B, N].

        `positions` [B, N] default 0..N-1; `attn_mask` [B, N, N] bool (True = attend) defaults to
        causal. Same function as `NLDReference.forward` (see tests/test_bundled_model.py).
        """
        c = self.config
        B, N = input_ids.shape
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dev = input_ids.device
        if positions is None:
            positions = torch.arange(N, device=dev).expand(B, N)
        flat_pos = positions.reshape(-1)
        rope = c.rope_parameters
        q_scale = llama4_query_scale(flat_pos, float(rope.get("llama_4_scaling_beta") or 0.0),
                                     int(rope.get("original_max_position_embeddings", 16384)))
        mask4 = None if attn_mask is None else attn_mask[:, None]
        h = self.encoder.embed_tokens(input_ids)
        for layer in self.encoder.layers:
            a = layer.self_attn
            x = rms_norm(h, layer.input_layernorm.weight, c.rms_norm_eps)
            q = apply_rope(a.q_proj(x).view(B * N, H, D), flat_pos, self.inv_freq, self.rope_scale)
            k = apply_rope(a.k_proj(x).view(B * N, Hkv, D), flat_pos, self.inv_freq, self.rope_scale)
            v = a.v_proj(x).view(B, N, Hkv, D)
            q = (q * q_scale.to(q.dtype)[:, None, None]).view(B, N, H, D).transpose(1, 2)
            k = k.view(B, N, Hkv, D).transpose(1, 2)
            v = v.transpose(1, 2)
            if H != Hkv:
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            if mask4 is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4)
            h = h + a.o_proj(o.transpose(1, 2).reshape(B, N, H * D))
            x = rms_norm(h, layer.post_attention_layernorm.weight, c.rms_norm_eps)
            m = layer.mlp
            h = h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
        return self.diffusion_head(rms_norm(h, self.encoder.norm.weight, c.rms_norm_eps)).float()

    def hf_state_dict(self, dtype=None) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if dtype is not None:
            sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        return sd


def joint_loss(model: NLDTrainModel, clean: torch.Tensor, block_starts: torch.Tensor | None,
               noisy: torch.Tensor | None, masked: torch.Tensor | None, targets: torch.Tensor | None,
               block_size: int, pos_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AR next-token CE on `clean` [B, S]; diffusion CE on masked positions of the noisy blocks.

    noisy/masked/targets: [B, K, block_size]; the diffusion target of a masked position is the
    original token at the SAME position (not shifted), as FastDiffuser/LinearSpec read it.
    `pos_decay` > 0 weights a masked position by d**-pos_decay, d = its distance to the nearest
    known token on its left (the drafts that decide acceptance are the near ones); 0 = plain mean.
    """
    B, S = clean.shape
    if block_starts is None or block_starts.shape[1] == 0:
        logits = model(clean)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), clean[:, 1:].reshape(-1)), None
    K = block_starts.shape[1]
    ids = torch.cat([clean, noisy.reshape(B, K * block_size)], dim=1)
    offs = torch.arange(block_size, device=clean.device)
    pos = torch.cat([torch.arange(S, device=clean.device).expand(B, S),
                     (block_starts[:, :, None] + offs).reshape(B, K * block_size)], dim=1)
    logits = model(ids, pos, block_attention_mask(S, block_starts, block_size))
    V = logits.shape[-1]
    ar = F.cross_entropy(logits[:, : S - 1].reshape(-1, V), clean[:, 1:].reshape(-1))
    dl = logits[:, S:].reshape(B, K, block_size, V)[masked]
    if not pos_decay:
        return ar, F.cross_entropy(dl, targets[masked])
    idx = torch.arange(block_size, device=clean.device).expand_as(masked)
    last_known = torch.where(masked, torch.zeros_like(idx), idx).cummax(-1).values
    w = (idx - last_known).clamp(min=1).float().pow(-pos_decay)[masked]
    diff = (F.cross_entropy(dl, targets[masked], reduction="none") * w).sum() / w.sum()
    return ar, diff


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3",
              "__pycache__", "ensurepip", "venv", "pydoc_data", "unittest", "tkinter"}
HELDOUT_EVERY = 10  # every 10th file of the sorted selection is held out


def stdlib_files(split: str = "train", min_bytes: int = 2_000, max_bytes: int = 250_000) -> list[str]:
    """Sorted stdlib .py files (absolute paths); `split` is "train", "heldout" or "all"."""
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                if min_bytes <= os.path.getsize(path) <= max_bytes:
                    rels.append(os.path.relpath(path, root))
    rels.sort()
    if split == "all":
        chosen = rels
    elif split == "heldout":
        chosen = [r for i, r in enumerate(rels) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    elif split == "train":
        chosen = [r for i, r in enumerate(rels) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    else:
        raise ValueError(split)
    return [os.path.join(root, r) for r in chosen]


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().replace("\r\n", "\n").replace("\t", "    ")


_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w.])")
_STRING = re.compile(r"'([A-Za-z_ ]{3,30})'|\"([A-Za-z_ ]{3,30})\"")
_NEW_NAMES = ["value", "result", "items", "count", "index", "buffer", "target", "source", "node",
              "entry", "data", "total", "parts", "prefix", "handler", "config", "state", "key",
              "item", "record", "offset", "size", "text", "name", "path", "stream", "options"]


def _snippets(text: str, rng: random.Random, min_lines: int, max_lines: int, max_chars: int):
    lines = text.split("\n")
    if len(lines) < min_lines + 2:
        return None
    for _ in range(8):
        n = rng.randint(min_lines, max_lines)
        start = rng.randrange(0, max(1, len(lines) - n))
        chunk = lines[start : start + n]
        # Drop the common indentation, trim blank edges.
        while chunk and not chunk[0].strip():
            chunk = chunk[1:]
        while chunk and not chunk[-1].strip():
            chunk = chunk[:-1]
        if len(chunk) < min_lines:
            continue
        indent = min(len(l) - len(l.lstrip(" ")) for l in chunk if l.strip())
        chunk = [l[indent:] for l in chunk]
        snippet = "\n".join(chunk)
        if 60 <= len(snippet) <= max_chars and len(_IDENT.findall(snippet)) >= 3:
            return snippet
    return None


def _rename_target(snippet: str, rng: random.Random):
    idents = [w for w in _IDENT.findall(snippet) if not keyword.iskeyword(w) and w not in ("self", "None", "True", "False")]
    if not idents:
        return None
    old = rng.choice(idents)
    choices = [n for n in _NEW_NAMES if n != old and not re.search(rf"\b{n}\b", snippet)]
    style = rng.random()
    if style < 0.5 and choices:
        new = rng.choice(choices)
    elif style < 0.75:
        new = old + rng.choice(["_new", "_2", "_tmp", "_old", "_value"])
    else:
        new = "my_" + old.lstrip("_")
    return old, new


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :] if word[i] != word[i + 1] else word[:i] + word[i + 1 :]


def make_edit_example(text: str, rng: random.Random, min_lines: int = 4, max_lines: int = 14,
                      max_chars: int = 600) -> tuple[str, str] | None:
    """(prompt, answer) for a copy/edit task on a snippet of `text`; the answer restates the snippet.

    The prompt ends with the assistant header of the chat template; the answer ends with
    `<|im_end|>` (EOS 11).
    """
    snippet = _snippets(text, rng, min_lines, max_lines, max_chars)
    if snippet is None:
        return None
    kind = rng.choices(["repeat", "rename", "typo", "number", "string", "comment", "delete"],
                       weights=[3, 5, 3, 1, 1, 1, 1])[0]
    shown, answer = snippet, None
    if kind == "repeat":
        instruction = rng.choice(["Repeat the following code exactly.", "Copy this code.",
                                  "Return the code unchanged.", "Echo the snippet below."])
        answer = snippet
    elif kind == "rename":
        t = _rename_target(snippet, rng)
        if t:
            old, new = t
            instruction = rng.choice([f"Rename `{old}` to `{new}`.", f"Rename {old} to {new} in this code.",
                                      f"Replace every `{old}` with `{new}`."])
            answer = re.sub(rf"\b{re.escape(old)}\b", new, snippet)
    elif kind == "typo":
        words = [w for w in set(_IDENT.findall(snippet)) if len(w) >= 4 and not keyword.iskeyword(w)]
        if words:
            w = rng.choice(sorted(words))
            bad = _typo(w, rng)
            if bad != w:
                shown = re.sub(rf"\b{re.escape(w)}\b", bad, snippet, count=1)
                instruction = rng.choice(["Fix the typo in this code.", "Correct the misspelled name.",
                                          f"Fix the typo `{bad}`."])
                answer = snippet
    elif kind == "number":
        nums = _NUMBER.findall(snippet)
        if nums:
            old = rng.choice(nums)
            new = str(int(old) + rng.randint(1, 9))
            instruction = f"Change the number {old} to {new}."
            answer = re.sub(rf"(?<![\w.]){old}(?![\w.])", new, snippet)
    elif kind == "string":
        m = _STRING.search(snippet)
        if m:
            old = m.group(1) or m.group(2)
            new = rng.choice(_NEW_NAMES)
            instruction = f"Replace the string '{old}' with '{new}'."
            answer = snippet.replace(old, new)
    elif kind == "comment":
        instruction = "Add the comment `# edited` at the top."
        answer = "# edited\n" + snippet
    elif kind == "delete":
        lines = snippet.split("\n")
        if len(lines) >= 5:
            i = rng.randrange(1, len(lines))
            instruction = f"Delete line {i + 1}."
            answer = "\n".join(lines[:i] + lines[i + 1 :])
    if answer is None:
        instruction, answer = "Repeat the following code exactly.", snippet
    prompt = (f"<|im_start|>user\n{instruction}\n```python\n{shown}\n```<|im_end|>\n"
              f"<|im_start|>assistant\n")
    return prompt, f"```python\n{answer}\n```<|im_end|>"


# --------------------------------------------------------------------------------------------
# Held-out prompt sets
# --------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    name: str
    input_ids: list[int]
    max_new_tokens: int


def heldout_prompt_sets(tokenizer, n_per_set: int = 8, continuation_tokens: int = 192,
                        max_new_tokens: int = 128, seed: int = 1234) -> dict[str, list[Prompt]]:
    """Deterministic held-out prompts: "continuation" (a held-out file's prefix) and "edit"
    (copy/edit tasks on held-out snippets whose answer restates text given in the prompt)."""
    files = stdlib_files("heldout")
    rng = random.Random(seed)
    cont, edit = [], []
    order = list(range(len(files)))
    rng.shuffle(order)
    for idx in order:
        text = read_text(files[idx])
        name = os.path.basename(files[idx])
        if len(cont) < n_per_set:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > continuation_tokens * 3:
                start = rng.randrange(0, len(ids) - continuation_tokens * 2)
                cont.append(Prompt(f"cont:{name}", ids[start : start + continuation_tokens], max_new_tokens))
        if len(edit) < n_per_set:
            ex = make_edit_example(text, rng, min_lines=6, max_lines=12, max_chars=500)
            if ex is not None:
                ids = tokenizer(ex[0], add_special_tokens=False)["input_ids"]
                edit.append(Prompt(f"edit:{name}", ids, max_new_tokens + 32))
        if len(cont) >= n_per_set and len(edit) >= n_per_set:
            break
    return {"continuation": cont, "edit": edit}
