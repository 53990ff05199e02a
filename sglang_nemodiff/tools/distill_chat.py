"""Self-distillation of a draft adapter for a converted AR chat model (shifted draft convention).

The AR weights stay frozen and the adapter runs only in the draft pass, so AR output is unchanged
and LinearSpec stays lossless; the adapter only has to predict the model's own greedy answers.

1. `generate_answers`: the model's greedy chat answers to template prompts (chat_prompts.py),
   batched in transformers (left padding).
2. `teacher_pass`: one causal pass of the reference model over each prompt + answer keeps the
   committed KV (exactly what a LinearSpec round sees as its cached prefix) and, at every answer
   position, the top-k of the model's next-token distribution: soft targets carry far more signal
   per step than argmax labels.
3. `draft_loss`: many blocks `[seed, MASK x (B-1)]` per step, each over its own cached prefix,
   bidirectional within the block, adapter on. Shifted convention: the output at slot j predicts
   slot j + 1, so its target is the teacher distribution at the block position p + j. Position
   j is weighted exp(-j / tau): acceptance is a prefix, early slots matter most.
4. `teacher_forced_acceptance`: for blocks of held-out answers, the leading drafts equal to the
   teacher's argmax: exactly LinearSpec's accepted drafts for a block starting there.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_nemodiff.reference.model import NLDReference, apply_rope, rms_norm
from sglang_nemodiff.tools.distill import DraftLoRA, lr_schedule


@dataclass
class ChatSequence:
    tokens: list[int]  # prompt + greedy answer (EOS kept)
    prompt_len: int
    keys: list | None = None  # per layer [Hkv, T, D] committed causal keys (after RoPE)
    values: list | None = None
    top_ids: torch.Tensor | None = None  # [T, k] teacher top-k at every position
    top_probs: torch.Tensor | None = None
    argmax: torch.Tensor | None = None  # [T] teacher argmax (what LinearSpec's verify computes)


def generate_answers(hf_model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     eos_id: int, batch_size: int = 32, log=print) -> list[ChatSequence]:
    """Greedy answers, `batch_size` prompts at a time (left padding), trimmed after EOS."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    started = time.time()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = hf_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=pad, eos_token_id=eos_id)
        for p, row in zip(chunk, gen[:, width:].tolist()):
            answer = row[: row.index(eos_id) + 1] if eos_id in row else row
            out.append(ChatSequence(tokens=p + answer, prompt_len=len(p)))
        log(f"  generated {len(out)}/{len(prompts)} answers, "
            f"{sum(len(s.tokens) - s.prompt_len for s in out)} tokens, {time.time() - started:.0f} s")
    return out


@torch.no_grad()
def teacher_pass(model: NLDReference, seqs: list[ChatSequence], top_k: int = 32) -> None:
    for s in seqs:
        logits, kv = model(torch.tensor(s.tokens), causal=True)
        s.keys = [k.contiguous() for k, _ in kv]
        s.values = [v.contiguous() for _, v in kv]
        probs = logits.softmax(-1)
        s.top_probs, s.top_ids = probs.topk(top_k, -1)
        s.top_probs = s.top_probs.half()
        s.top_ids = s.top_ids.int()
        s.argmax = logits.argmax(-1)


def block_seeds(seqs: list[ChatSequence]) -> list[tuple[int, int]]:
    """(sequence, seed position) of every block a LinearSpec round can start: the seed is a
    committed answer token with at least one token after it."""
    return [(i, p) for i, s in enumerate(seqs) for p in range(s.prompt_len, len(s.tokens) - 1)]


def make_batch(seqs: list[ChatSequence], picks: list[tuple[int, int]], block_size: int,
               mask_id: int, causal_seed: bool = False):
    """Blocks [N, B] (seed + masks), positions, the padded cached prefix per layer, its validity
    mask [N, L], and per slot j the teacher top-k at position p + j (slot j predicts p + j + 1;
    -1 ids where that position is past the sequence).

    `causal_seed` (config.py): the seed row runs causally with the base weights, so its K/V are
    the committed ones and its output is AR's prediction for slot 1; the rows to train are then
    the B - 1 masks after it, over a prefix that includes the seed."""
    if causal_seed:
        picks = [(i, p + 1) for i, p in picks]
        block_size -= 1
    N, B = len(picks), block_size
    L = max(p for _, p in picks)
    layers = len(seqs[0].keys)
    hkv, _, d = seqs[0].keys[0].shape
    k_top = seqs[0].top_ids.shape[1]
    blocks = torch.full((N, B), mask_id, dtype=torch.long)
    positions = torch.zeros(N, B, dtype=torch.long)
    prefix_ok = torch.zeros(N, L, dtype=torch.bool)
    past_k = [torch.zeros(N, hkv, L, d) for _ in range(layers)]
    past_v = [torch.zeros(N, hkv, L, d) for _ in range(layers)]
    tgt_ids = torch.full((N, B, k_top), -1, dtype=torch.long)
    tgt_probs = torch.zeros(N, B, k_top)
    argmax = torch.full((N, B), -1, dtype=torch.long)
    for n, (i, p) in enumerate(picks):
        s = seqs[i]
        if not causal_seed:
            blocks[n, 0] = s.tokens[p]
        positions[n] = torch.arange(p, p + B)
        prefix_ok[n, :p] = True
        for layer in range(layers):
            past_k[layer][n, :, :p] = s.keys[layer][:, :p]
            past_v[layer][n, :, :p] = s.values[layer][:, :p]
        last = min(p + B, len(s.tokens) - 1)  # positions p..last-1 have a next token
        tgt_ids[n, : last - p] = s.top_ids[p:last].long()
        tgt_probs[n, : last - p] = s.top_probs[p:last].float()
        argmax[n, : last - p] = s.argmax[p:last]
    return blocks, positions, past_k, past_v, prefix_ok, tgt_ids, tgt_probs, argmax


def draft_forward(model: NLDReference, lora: DraftLoRA | None, blocks, positions, past_k, past_v,
                  prefix_ok) -> torch.Tensor:
    """Draft-pass logits [N, B, V] (raw rows: row j predicts slot j + 1): every block attends to
    its cached prefix and bidirectionally to itself; the adapter is added to o_proj."""
    c = model.config
    N, B = blocks.shape
    H, Hkv, D = model.n_heads, model.n_kv, model.head_dim
    flat_pos = positions.reshape(-1)
    allowed = torch.cat([prefix_ok, torch.ones(N, B, dtype=torch.bool)], 1)[:, None, None, :]
    h = model.embed_tokens(blocks).reshape(N * B, -1)
    for i, layer in enumerate(model.layers):
        x = rms_norm(h, layer.input_layernorm, c.rms_norm_eps)
        q = apply_rope(layer.q_proj(x).view(N * B, H, D), flat_pos, model.inv_freq, model.rope_scale)
        k = apply_rope(layer.k_proj(x).view(N * B, Hkv, D), flat_pos, model.inv_freq, model.rope_scale)
        v = layer.v_proj(x).view(N * B, Hkv, D)
        q = q.view(N, B, H, D).transpose(1, 2)  # [N, H, B, D]
        k = torch.cat([past_k[i], k.view(N, B, Hkv, D).transpose(1, 2)], 2)
        v = torch.cat([past_v[i], v.view(N, B, Hkv, D).transpose(1, 2)], 2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(N * B, H * D)
        out = layer.o_proj(attn)
        if lora is not None:
            out = out + lora.delta(i, attn)
        h = h + out
        x = rms_norm(h, layer.post_attention_layernorm, c.rms_norm_eps)
        h = h + layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))
    logits = model.diffusion_head(rms_norm(h, model.norm, c.rms_norm_eps)).float()
    return logits.view(N, B, -1)


def position_weights(block_size: int, tau: float) -> torch.Tensor:
    j = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-j / tau)
    w[-1] = 0.0  # the last slot predicts past the block: no draft reads it
    return w


def draft_loss(model, lora, batch, mask_id: int, weights: torch.Tensor) -> torch.Tensor:
    blocks, positions, past_k, past_v, prefix_ok, tgt_ids, tgt_probs, _ = batch
    logits = draft_forward(model, lora, blocks, positions, past_k, past_v, prefix_ok)
    logits[..., mask_id] = -1e9  # a draft is never the mask token
    logp = logits.log_softmax(-1)
    valid = tgt_ids[..., 0] >= 0
    probs = tgt_probs / tgt_probs.sum(-1, keepdim=True).clamp(min=1e-6)
    ce = -(logp.gather(-1, tgt_ids.clamp(min=0)) * probs).sum(-1)  # soft CE vs the top-k
    w = weights[None, :] * valid
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def teacher_forced_acceptance(model, lora, batch, mask_id: int, causal_seed: bool = False
                              ) -> torch.Tensor:
    """Accepted drafts per block: drafts for slots 1..B-1 (rows 0..B-2) equal to the teacher's
    argmax, counted up to the first miss (or the end of the answer). With `causal_seed` the
    first draft is the seed's causal prediction, the teacher's own argmax (always accepted; every
    seed has a token after it), and the rows are the drafts for slots 2.. ."""
    blocks, positions, past_k, past_v, prefix_ok, _, _, argmax = batch
    logits = draft_forward(model, lora, blocks, positions, past_k, past_v, prefix_ok)
    logits[..., mask_id] = float("-inf")
    drafts = logits.argmax(-1)[:, :-1]
    hits = (drafts == argmax[:, :-1]) & (argmax[:, :-1] >= 0)
    return hits.int().cumprod(1).sum(1) + int(causal_seed)


def train(model: NLDReference, lora: DraftLoRA, train_seqs, eval_batches, *, minutes: float,
          blocks_per_step: int, block_size: int, lr: float, tau: float, mask_id: int, seed: int,
          eval_every_minutes: float, causal_seed: bool = False, log=print):
    """AdamW on the adapter for `minutes` of training time (cosine schedule over the expected
    step count, re-estimated from the measured step time); evaluation every few minutes. Returns
    (best adapter state by held-out acceptance, history rows)."""
    rng = random.Random(seed)
    seeds = block_seeds(train_seqs)
    opt = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    weights = position_weights(block_size - int(causal_seed), tau)
    history, best, ema = [], (-1.0, None), None
    trained, step, next_eval = 0.0, 0, 0.0
    expected_steps = None
    while True:
        if trained >= next_eval * 60:
            accepted = torch.cat([teacher_forced_acceptance(model, lora, b, mask_id, causal_seed)
                                  for b in eval_batches]).float()
            row = {"step": step, "minutes": round(trained / 60, 2), "loss": ema,
                   "accepted": round(accepted.mean().item(), 4),
                   "tpf_est": round((1 + accepted.mean().item()) / 2, 4)}
            history.append(row)
            log(row)
            if row["accepted"] > best[0]:
                best = (row["accepted"], {k: v.detach().clone() for k, v in lora.state_dict().items()})
            next_eval += eval_every_minutes
            if trained >= minutes * 60:
                break
        t0 = time.time()
        picks = [seeds[rng.randrange(len(seeds))] for _ in range(blocks_per_step)]
        batch = make_batch(train_seqs, picks, block_size, mask_id, causal_seed)
        if expected_steps is None and step == 5:
            expected_steps = max(10, int(minutes * 60 / (trained / 5)))
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, expected_steps or 10**6, lr, warmup=20)
        loss = draft_loss(model, lora, batch, mask_id, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        trained += time.time() - t0
        step += 1
    return best[1], history


def new_adapter(model: NLDReference, rank: int, seed: int) -> DraftLoRA:
    c = model.config
    return DraftLoRA(c.num_hidden_layers, model.n_heads * model.head_dim, c.hidden_size, rank,
                     alpha=float(rank), seed=seed)


def load_adapter(lora: DraftLoRA, path: str) -> None:
    """Continue training from a saved adapter (PEFT layout, as DraftLoRA.save writes it)."""
    import os

    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    with torch.no_grad():
        for i in range(lora.A.shape[0]):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            lora.A[i].copy_(tensors[f"{key}.lora_A.weight"].float())
            lora.B[i].copy_(tensors[f"{key}.lora_B.weight"].float())


def eval_batches(seqs, block_size: int, mask_id: int, n_blocks: int, seed: int, per_batch: int = 32,
                 causal_seed: bool = False):
    rng = random.Random(seed)
    seeds = block_seeds(seqs)
    picks = rng.sample(seeds, min(n_blocks, len(seeds)))
    return [make_batch(seqs, picks[i:i + per_batch], block_size, mask_id, causal_seed)
            for i in range(0, len(picks), per_batch)]


def freeze(model: NLDReference) -> NLDReference:
    for p in model.parameters():
        p.requires_grad_(False)
    return model

