"""Self-distillation of the draft-only LoRA (LinearSpec) from the model's own greedy continuations.

LinearSpec accepts the longest prefix of drafts equal to the causal argmax, and every committed
token is a greedy (AR) token. So the draft pass only has to predict the model's own greedy
continuation -- a deterministic function of the context -- not the true text. The recipe:

1. `build_prompts`: diverse prompts from the TRAINING corpus only (code continuations at random
   points, function headers with and without their file context, copy/edit tasks in the chat
   format).
2. `greedy_generate`: batched greedy decoding with a KV cache (base weights). The causal KV of every
   prompt + generated sequence is kept: it is exactly the cache LinearSpec would hold there, and the
   draft LoRA never touches it.
3. `DraftLoRA` + `draft_loss`: blocks `[seed, MASK x 31]` with the seed anywhere in the generated
   part attend bidirectionally to themselves and to the frozen cached prefix; cross-entropy of the
   draft logits (mask id excluded) toward the greedy tokens, position j weighted exp(-(j-1)/tau)
   (acceptance is a prefix, so early positions matter most). Only the LoRA is trained: forward and
   backward run over the 32-token blocks only, never over the prefix.
4. `acceptance`: teacher-forced acceptance length of the drafts (number of leading drafts equal to
   the greedy tokens) at fixed blocks of validation sequences -- exactly LinearSpec's accepted
   drafts for a block starting there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sglang_nemodiff.reference.model import apply_rope, llama4_query_scale, rms_norm
from sglang_nemodiff.tools.training import NLDTrainModel, make_edit_example, read_text


# --------------------------------------------------------------------------------------------
# Draft LoRA (PEFT layout on o_proj)
# --------------------------------------------------------------------------------------------


class DraftLoRA(nn.Module):
    """Per layer o_proj LoRA: delta(x) = (x @ A^T @ B^T) * alpha / r. A [r, in], B [out, r]."""

    def __init__(self, num_layers: int, in_features: int, out_features: int, rank: int, alpha: float,
                 seed: int = 0):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)  # PEFT's default (kaiming-uniform, a=sqrt(5)) for A
        self.A = nn.Parameter((torch.rand(num_layers, rank, in_features, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(num_layers, out_features, rank))  # starts as the base draft

    def delta(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A[layer].t() @ self.B[layer].t()) * self.scale

    def peft_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.A.shape[0]):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            out[f"{key}.lora_A.weight"] = self.A[i].detach().cpu().to(dtype).contiguous()
            out[f"{key}.lora_B.weight"] = self.B[i].detach().cpu().to(dtype).contiguous()
        return out

    def save(self, path: str, dtype=torch.float32):
        import json
        import os

        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file(self.peft_state_dict(dtype), os.path.join(path, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                       "lora_alpha": self.alpha, "target_modules": ["o_proj"], "lora_dropout": 0.0,
                       "bias": "none", "inference_mode": True}, f, indent=2)


# --------------------------------------------------------------------------------------------
# Forward over a cached prefix
# --------------------------------------------------------------------------------------------


def forward_cached(model: NLDTrainModel, ids: torch.Tensor, positions: torch.Tensor,
                   past: list[tuple[torch.Tensor, torch.Tensor]] | None, mask: torch.Tensor,
                   lora: DraftLoRA | None = None, write_at: int | None = None):
    """Logits [B, T, V] of `ids` [B, T] at `positions` [B, T] after a cached prefix.

    past: per layer (K, V) [B, Hkv, L, D] (post-RoPE keys, as the inference KV cache);
    mask [B, T, L + T] bool (True = attend) over [past | new]. Returns logits and the new tokens'
    per-layer (K, V) [B, Hkv, T, D]. Same function as `NLDReference.forward`.
    With `write_at`, `past` are preallocated buffers: the new K/V are written into them at
    [write_at, write_at + T) and attention runs over [0, write_at + T) (no copy of the cache).
    """
    c = model.config
    B, T = ids.shape
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    flat_pos = positions.reshape(-1)
    rope = c.rope_parameters
    q_scale = llama4_query_scale(flat_pos, float(rope.get("llama_4_scaling_beta") or 0.0),
                                 int(rope.get("original_max_position_embeddings", 16384)))
    g = H // Hkv
    mg = mask[:, None, None].expand(B, 1, g, T, mask.shape[-1]).reshape(B, 1, g * T, mask.shape[-1])
    h = model.encoder.embed_tokens(ids)
    new_kv = []
    for i, layer in enumerate(model.encoder.layers):
        a = layer.self_attn
        x = rms_norm(h, layer.input_layernorm.weight, c.rms_norm_eps)
        q = apply_rope(a.q_proj(x).view(B * T, H, D), flat_pos, model.inv_freq, model.rope_scale)
        k = apply_rope(a.k_proj(x).view(B * T, Hkv, D), flat_pos, model.inv_freq, model.rope_scale)
        q = (q * q_scale.to(q.dtype)[:, None, None]).view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = a.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        new_kv.append((k, v))
        if write_at is not None:
            past[i][0][:, :, write_at : write_at + T] = k
            past[i][1][:, :, write_at : write_at + T] = v
            k, v = past[i][0][:, :, : write_at + T], past[i][1][:, :, : write_at + T]
        elif past is not None:
            k = torch.cat([past[i][0], k], dim=2)
            v = torch.cat([past[i][1], v], dim=2)
        # GQA without copying K/V: the query heads sharing a KV head become extra query rows.
        g = H // Hkv
        qg = q.reshape(B, Hkv, g * T, D)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)
        o = o.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        out = a.o_proj(o)
        if lora is not None:
            out = out + lora.delta(i, o)
        h = h + out
        x = rms_norm(h, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        m = layer.mlp
        h = h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    return model.diffusion_head(rms_norm(h, model.encoder.norm.weight, c.rms_norm_eps)).float(), new_kv


# --------------------------------------------------------------------------------------------
# Greedy generation with a KV cache
# --------------------------------------------------------------------------------------------


@dataclass
class Sequence:
    tokens: list[int]  # prompt + greedy continuation (ends at EOS or the budget)
    prompt_len: int
    kv: torch.Tensor  # [layers, 2, Hkv, len(tokens) - 1, D]: causal KV of tokens[:-1]
    kind: str = ""


@torch.no_grad()
def greedy_generate(model: NLDTrainModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                    batch_size: int = 32, kv_dtype=torch.float32, kinds: list[str] | None = None,
                    progress=None) -> list[Sequence]:
    """Greedy continuations of `prompts` (batched, left-padded, KV cache), in the input order."""
    dev = model.diffusion_head.weight.device
    c = model.config
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Sequence | None] = [None] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        B = len(idx)
        P = max(len(prompts[i]) for i in idx)
        pad = torch.tensor([P - len(prompts[i]) for i in idx], device=dev)
        ids = torch.zeros(B, P, dtype=torch.long, device=dev)
        for r, i in enumerate(idx):
            ids[r, P - len(prompts[i]):] = torch.tensor(prompts[i], device=dev)
        cols = torch.arange(P, device=dev)
        pos = (cols[None] - pad[:, None]).clamp(min=0)
        valid = cols[None] >= pad[:, None]  # [B, P] real (not padding) keys
        Ltot = P + max_new_tokens
        mask = torch.zeros(B, 1, Ltot, dtype=torch.bool, device=dev)
        mask[:, 0, :P] = valid
        pre_mask = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :]
        pre_mask |= torch.eye(P, dtype=torch.bool, device=dev)[None]  # padding rows see themselves
        logits, kv = forward_cached(model, ids, pos, None, pre_mask)
        cache = [(torch.zeros(B, c.num_key_value_heads, Ltot, c.head_dim, device=dev),
                  torch.zeros(B, c.num_key_value_heads, Ltot, c.head_dim, device=dev)) for _ in kv]
        for (ck, cv), (k, v) in zip(cache, kv):
            ck[:, :, :P], cv[:, :, :P] = k, v
        tok = logits[:, -1].argmax(-1)
        gen = [tok]
        done = tok == eos_id
        for t in range(1, max_new_tokens):
            if bool(done.all()):
                break
            L = P + t - 1  # slot of the token being fed
            mask[:, 0, L] = True
            logits, _ = forward_cached(model, tok[:, None], (pos[:, -1] + t)[:, None], cache,
                                       mask[:, :, : L + 1], write_at=L)
            tok = logits[:, -1].argmax(-1)
            gen.append(tok)
            done |= tok == eos_id
        gen_t = torch.stack(gen, 1).cpu()
        for r, i in enumerate(idx):
            g = gen_t[r].tolist()
            if eos_id in g:
                g = g[: g.index(eos_id) + 1]
            toks = list(prompts[i]) + g
            p0 = int(pad[r])
            n = len(toks) - 1
            kvr = torch.stack([torch.stack([ck[r, :, p0 : p0 + n], cv[r, :, p0 : p0 + n]])
                               for ck, cv in cache]).to("cpu", kv_dtype).contiguous()
            out[i] = Sequence(toks, len(prompts[i]), kvr, kinds[i] if kinds else "")
        if progress is not None:
            progress(min(b0 + batch_size, len(order)), len(order))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Prompts from the training corpus
# --------------------------------------------------------------------------------------------

_DEF = ("def ", "class ", "    def ", "async def ")


def build_prompts(files: list[str], tokenizer, n: int, rng: random.Random,
                  mix: dict[str, float] | None = None) -> tuple[list[list[int]], list[str]]:
    """`n` prompts (token ids) and their kinds from the given (training) files.

    kinds: "cont" (a random 64-256-token window of a file; continue it), "def" (the file up to and
    including a `def`/`class` header line, at most 192 tokens), "head" (a bare `def` header line
    with no context), "edit" (a copy/edit task in the chat format, see `make_edit_example`).
    """
    mix = mix or {"cont": 0.4, "def": 0.15, "head": 0.05, "edit": 0.4}
    kinds_list, weights = list(mix), list(mix.values())
    prompts, kinds = [], []
    cache: dict[int, tuple[str, list[int]]] = {}

    def file_ids(fi):
        if fi not in cache:
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
            text = read_text(files[fi])
            cache[fi] = (text, tokenizer(text, add_special_tokens=False)["input_ids"])
        return cache[fi]

    while len(prompts) < n:
        kind = rng.choices(kinds_list, weights)[0]
        fi = rng.randrange(len(files))
        if kind == "edit":
            text = read_text(files[fi])
            ex = make_edit_example(text, rng, min_lines=rng.choice([4, 6]), max_lines=rng.choice([10, 12, 14]),
                                   max_chars=500)
            if ex is None:
                continue
            ids = tokenizer(ex[0], add_special_tokens=False)["input_ids"]
        elif kind == "cont":
            _, toks = file_ids(fi)
            L = rng.randint(64, 256)
            if len(toks) < L + 64:
                continue
            s = rng.randrange(0, len(toks) - L - 32)
            ids = toks[s : s + L]
        else:
            text, _ = file_ids(fi)
            lines = text.split("\n")
            heads = [i for i, l in enumerate(lines) if l.lstrip().startswith(("def ", "class ", "async def "))
                     and l.rstrip().endswith(":")]
            if not heads:
                continue
            i = rng.choice(heads)
            if kind == "head":
                ids = tokenizer(lines[i].strip() + "\n", add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer("\n".join(lines[: i + 1]) + "\n", add_special_tokens=False)["input_ids"][-192:]
        if len(ids) < 4:
            continue
        prompts.append(ids)
        kinds.append(kind)
    return prompts, kinds


# --------------------------------------------------------------------------------------------
# Draft loss and acceptance
# --------------------------------------------------------------------------------------------


def sample_blocks(seqs: list[Sequence], n_blocks: int, rng: random.Random, block_size: int = 32,
                  first_block_frac: float = 0.1) -> list[int]:
    """Seed positions (anywhere in the generated part; some at its first token, where LinearSpec's
    first block starts). A seed needs at least one target after it."""
    out = []
    for s in seqs:
        lo, hi = s.prompt_len, len(s.tokens) - 2
        for _ in range(n_blocks):
            out.append(lo if hi <= lo or rng.random() < first_block_frac else rng.randint(lo, hi))
    return out


def block_batch(seqs: list[Sequence], seeds: list[int], n_blocks: int, mask_id: int, block_size: int,
                device, dtype=torch.float32, quadratic: bool = False):
    """Inputs for `forward_cached`: B = len(seqs) rows of n_blocks blocks; seeds [B * n_blocks].

    `quadratic`: the block is a quadratic round's draft group instead (quadratic_layout.py): the
    committed token at the seed position p is in the prefix, and the group's masks stand at
    p + 1 .. p + block_size, the first at the bonus's position (not yet known when the group
    drafts; the bonus replaces it), so slot j's target is the greedy token at p + 1 + j and the
    drafts that count start at slot 1, as in LinearSpec's blocks."""
    B, K, bs = len(seqs), n_blocks, block_size
    shift = 1 if quadratic else 0  # the block starts after the seed position
    st = torch.tensor(seeds, dtype=torch.long).view(B, K) + shift
    Lp = int(st.max())  # the prefix a block needs is positions < its first slot
    n_layers = seqs[0].kv.shape[0]
    kv = torch.zeros(n_layers, 2, B, seqs[0].kv.shape[2], Lp, seqs[0].kv.shape[4], dtype=dtype)
    for r, s in enumerate(seqs):
        m = min(Lp, s.kv.shape[3])
        kv[:, :, r, :, :m] = s.kv[:, :, :, :m].to(dtype)
    kv = kv.to(device)
    past = [(kv[l, 0], kv[l, 1]) for l in range(n_layers)]
    j = torch.arange(bs)
    pos = (st[:, :, None] + j).view(B, K * bs)
    ids = torch.full((B, K, bs), mask_id, dtype=torch.long)
    targets = torch.full((B, K, bs), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        t = torch.tensor(s.tokens)
        for k in range(K):
            p = int(st[r, k])
            if quadratic:
                seg = t[p : p + bs]
                targets[r, k, : len(seg)] = seg
            else:
                ids[r, k, 0] = t[p]
                seg = t[p + 1 : p + bs]
                targets[r, k, 1 : 1 + len(seg)] = seg
    mask = torch.zeros(B, K * bs, Lp + K * bs, dtype=torch.bool)
    cols = torch.arange(Lp)
    for k in range(K):
        rows = slice(k * bs, (k + 1) * bs)
        mask[:, rows, :Lp] = (cols[None, :] < st[:, k : k + 1])[:, None, :]
        mask[:, rows, Lp + k * bs : Lp + (k + 1) * bs] = True
    return (ids.view(B, K * bs).to(device), pos.to(device), past, mask.to(device), targets.to(device))


def position_weights(block_size: int, tau: float, device=None) -> torch.Tensor:
    j = torch.arange(block_size, dtype=torch.float32, device=device)
    w = torch.exp(-(j - 1).clamp(min=0) / tau) if tau > 0 else torch.ones(block_size, device=device)
    w[0] = 0.0
    return w


def draft_loss(model: NLDTrainModel, lora: DraftLoRA, batch, mask_id: int, weights: torch.Tensor,
               reach: float = 0.0):
    """Weighted CE of the draft logits toward the greedy tokens.

    Position j of a block is weighted `weights[j]`; with `reach` > 0 the weight becomes
    `reach_j + reach * weights[j]`, where reach_j = prod_{i<j} p_i is the current draft's probability
    (no gradient) of getting every earlier position of the block right, i.e. of the block's
    acceptance reaching position j.
    """
    ids, pos, past, mask, targets = batch
    B, Kbs = ids.shape
    bs = weights.shape[0]
    logits, _ = forward_cached(model, ids, pos, past, mask, lora)
    logits = logits.view(B, Kbs // bs, bs, -1)
    logits[..., mask_id] = -1e9
    valid = targets >= 0
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ce = -logp
    w = weights.expand_as(targets)
    if reach > 0:
        p = torch.where(valid, logp.detach().exp(), torch.zeros_like(logp))
        p[..., 0] = 1.0  # the seed
        r = torch.cumprod(p, -1)
        r = torch.cat([torch.ones_like(r[..., :1]), r[..., :-1]], -1)  # prod over i < j
        w = r + reach * w
    w = w * valid
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def acceptance(model: NLDTrainModel, lora: DraftLoRA | None, batches, mask_id: int) -> dict[str, float]:
    """Mean accepted drafts per block (leading drafts equal to the greedy tokens), draft accuracy
    at block position 1, and the implied LinearSpec tokens per forward (accepted + 1) / 2."""
    acc, first, n = 0.0, 0.0, 0
    for ids, pos, past, mask, targets in batches:
        B, Kbs = ids.shape
        bs = 32 if Kbs % 32 == 0 else Kbs
        logits, _ = forward_cached(model, ids, pos, past, mask, lora)
        logits = logits.view(B, Kbs // bs, bs, -1)
        logits[..., mask_id] = -1e9
        ok = (logits.argmax(-1) == targets) & (targets >= 0)
        run = ok[..., 1:].int().cumprod(-1).sum(-1)
        acc += float(run.sum())
        first += float(ok[..., 1].sum())
        n += run.numel()
    a = acc / max(n, 1)
    return {"accepted": a, "acc1": first / max(n, 1), "tpf_est": (a + 1) / 2}


# --------------------------------------------------------------------------------------------
# Exact LinearSpec tokens per forward from the greedy sequence
# --------------------------------------------------------------------------------------------


class LinearSpecEval:
    """LinearSpec's exact tokens per forward on a prompt set, computed from the AR sequences.

    At temperature 0 LinearSpec's output is the greedy sequence, and the block seeded at position p
    sees exactly the greedy prefix: its accepted drafts are the leading draft tokens equal to the
    greedy tokens after p. So the draft pass is run once at every seed position of the greedy
    continuations (batched) and LinearSpec's block chain (prefill, then 2 forwards per block,
    output cut at EOS / the budget) is replayed from those acceptance lengths -- the same tokens,
    forwards and acceptance as `reference.generate.linearspec_generate`, up to float rounding.
    """

    def __init__(self, model: NLDTrainModel, prompts: list[list[int]], budgets: list[int], eos_id: int,
                 mask_id: int, block_size: int = 32, rows: int = 64, batch_size: int = 32):
        self.eos_id, self.mask_id, self.bs = eos_id, mask_id, block_size
        self.budgets = budgets
        self.seqs = greedy_generate(model, prompts, max(budgets) + block_size, eos_id, batch_size=batch_size)
        items = []
        for i, (s, b) in enumerate(zip(self.seqs, budgets)):
            for p in range(s.prompt_len, min(len(s.tokens) - 1, s.prompt_len + b - 1)):
                items.append((i, p))
        self.chunks = [items[j : j + rows] for j in range(0, len(items), rows)]

    @torch.no_grad()
    def __call__(self, model: NLDTrainModel, lora: DraftLoRA | None) -> dict[str, float]:
        dev = model.diffusion_head.weight.device
        accept = [dict() for _ in self.seqs]
        for chunk in self.chunks:
            ids, pos, past, mask, targets = block_batch([self.seqs[i] for i, _ in chunk], [p for _, p in chunk],
                                                        1, self.mask_id, self.bs, "cpu")
            batch = (ids.to(dev), pos.to(dev), [(k.to(dev), v.to(dev)) for k, v in past], mask.to(dev),
                     targets.to(dev))
            logits, _ = forward_cached(model, *batch[:4], lora)
            logits = logits.view(batch[4].shape + (-1,))
            logits[..., self.mask_id] = -1e9
            ok = (logits.argmax(-1) == batch[4]) & (batch[4] >= 0)
            run = ok[..., 1:].int().cumprod(-1).sum(-1).view(-1).tolist()
            for (i, p), r in zip(chunk, run):
                accept[i][p] = r
        tokens = forwards = 0
        accepted = []
        for s, acc, budget in zip(self.seqs, accept, self.budgets):
            gen = s.tokens[s.prompt_len :]
            n, fw = 1, 1
            while n < budget and self.eos_id not in gen[:n]:
                c = acc.get(s.prompt_len + n - 1, 0)
                accepted.append(c)
                n += c + 1
                fw += 2
            out = gen[:n]
            if self.eos_id in out:
                out = out[: out.index(self.eos_id) + 1]
            tokens += len(out[:budget])
            forwards += fw
        return {"tpf": tokens / forwards, "accepted": sum(accepted) / max(len(accepted), 1),
                "tokens": tokens, "forwards": forwards}


def validation_prompts(files: list[str], tokenizer, n: int, seed: int, continuation_tokens: int = 192,
                       max_new_tokens: int = 128) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Prompts shaped like `heldout_prompt_sets` (a 192-token file window, budget 128; a copy/edit
    task, budget 160) from the given files: {"continuation": (prompts, budgets), "edit": ...}."""
    rng = random.Random(seed)
    order = list(range(len(files)))
    rng.shuffle(order)
    cont, edit = [], []
    for fi in order:
        text = read_text(files[fi])
        if len(cont) < n:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > continuation_tokens * 3:
                s = rng.randrange(0, len(ids) - continuation_tokens * 2)
                cont.append(ids[s : s + continuation_tokens])
        if len(edit) < n:
            ex = make_edit_example(text, rng, min_lines=6, max_lines=12, max_chars=500)
            if ex is not None:
                edit.append(tokenizer(ex[0], add_special_tokens=False)["input_ids"])
        if len(cont) >= n and len(edit) >= n:
            break
    return {"continuation": (cont, [max_new_tokens] * len(cont)),
            "edit": (edit, [max_new_tokens + 32] * len(edit))}


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------


def lr_schedule(step: int, steps: int, lr: float, warmup: int, final_frac: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to `final_frac * lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_draft_lora(model: NLDTrainModel, lora: DraftLoRA, data: list[Sequence], *, steps: int,
                     seqs_per_step: int, blocks_per_seq: int, lr: float, warmup: int, tau: float,
                     mask_id: int, block_size: int, seed: int, reach: float = 0.0, evaluate=None,
                     eval_every: int = 0, first_block_frac: float = 0.1, log=print,
                     quadratic: bool = False, slot0_weight: float = 0.0):
    """AdamW on the LoRA only; `evaluate(lora) -> (score, info)` every `eval_every` steps and at the
    end; returns (best state_dict by score, history rows). `quadratic`: train on quadratic draft
    groups (block_batch) instead of LinearSpec blocks; `slot0_weight`: the weight of a group's
    slot 0 (the bonus's position, whose draft the bonus replaces, so 0 scores nothing)."""
    dev = model.diffusion_head.weight.device
    data = [s for s in data if len(s.tokens) - s.prompt_len >= 2]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    weights = position_weights(block_size, tau, dev)
    weights[0] = slot0_weight  # quadratic groups: slot 0 (the bonus's position) as an extra target
    history, best, ema = [], (-float("inf"), None, 0), None
    t_train = 0.0

    def do_eval(step):
        nonlocal best
        score, info = evaluate(lora)
        row = {"step": step, "minutes": t_train / 60, "loss": ema, **info}
        history.append(row)
        if score > best[0]:
            best = (score, {k: v.detach().clone() for k, v in lora.state_dict().items()}, step)
        log(row)

    if evaluate is not None:
        do_eval(0)
    import time

    for step in range(steps):
        t0 = time.time()
        seqs = [data[rng.randrange(len(data))] for _ in range(seqs_per_step)]
        seeds = sample_blocks(seqs, blocks_per_seq, rng, block_size, first_block_frac)
        ids, pos, past, mask, targets = block_batch(seqs, seeds, blocks_per_seq, mask_id, block_size, "cpu",
                                                    quadratic=quadratic)
        batch = (ids.to(dev), pos.to(dev), [(k.to(dev), v.to(dev)) for k, v in past], mask.to(dev),
                 targets.to(dev))
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, steps, lr, warmup)
        loss = draft_loss(model, lora, batch, mask_id, weights, reach)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        t_train += time.time() - t0
        if evaluate is not None and ((eval_every and (step + 1) % eval_every == 0) or step == steps - 1):
            do_eval(step + 1)
    if best[1] is None:
        best = (0.0, {k: v.detach().clone() for k, v in lora.state_dict().items()}, steps)
    return best[1], best[2], history
