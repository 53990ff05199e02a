#!/usr/bin/env python
"""Train the bundled small NLD model (`sglang_nemodiff/bundled/nld-tiny/`), end to end, one command:

    python launch/train_bundled_model.py --out sglang_nemodiff/bundled/nld-tiny

Stages (fixed seeds; 1 torch thread on CPU by default, `--device cuda` runs the same on a GPU):

1. `base1`: byte-level BPE tokenizer, then plain AR (next-token CE) and joint
   `L = L_AR + lambda * L_diffusion` on Python standard-library sources (every 10th file held out)
   and generated copy/edit examples. The diffusion loss uses noisy 32-token blocks `[seed, x1..x31]`
   (seed clean, the other positions masked with id 100 at a per-block ratio) that attend
   bidirectionally to themselves and to the clean causal prefix before them -- the inference pattern
   -- with CE on the masked positions predicting the token at the SAME position.
2. `base2`: the same objective continued on copy/edit examples only (distance-weighted diffusion CE).
3. `distill`: self-distillation of the draft-only LoRA (o_proj) used by LinearSpec's draft pass: the
   base model writes greedy continuations (batched, KV cache) of prompts from the training files; the
   LoRA learns to predict those greedy tokens for blocks `[seed, MASK x 31]` seeded anywhere in them,
   early block positions weighted more (see `sglang_nemodiff/tools/distill.py`). The base weights are
   not changed, so AR and LinearSpec outputs are those of the base model.

Stages can be run one at a time (`--stages base1`, ...); intermediate checkpoints go to `--work-dir`.
A single base phase with custom flags: `python launch/train_bundled_model.py base --out DIR [flags]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_nemodiff.checkpoint import check_checkpoint, config_json  # noqa: E402
from sglang_nemodiff.config import NemotronLabsDiffusionConfig  # noqa: E402
from sglang_nemodiff.tokenizer import EOS_ID, MASK_ID, build_tokenizer  # noqa: E402
from sglang_nemodiff.tools.training import (  # noqa: E402
    NLDTrainModel, joint_loss, make_edit_example, read_text, stdlib_files)

ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}


def parse_base_args(argv=None):
    p = argparse.ArgumentParser(prog="train_bundled_model.py base", description="One base training phase.")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=640)
    # data / schedule
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--blocks-per-seq", type=int, default=3, help="noisy 32-token blocks per sequence")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--ar-steps", type=int, default=50, help="AR-only warm start steps")
    p.add_argument("--diffusion-weight", type=float, default=0.7, help="lambda in L_AR + lambda*L_diff")
    p.add_argument("--diff-pos-decay", type=float, default=0.0,
                   help="weight masked positions by distance**-x to the nearest known token on the left")
    p.add_argument("--init-from", default=None,
                   help="continue from a checkpoint dir (its tokenizer and weights; model flags ignored)")
    p.add_argument("--copy-frac", type=float, default=0.75, help="fraction of sequences made of copy/edit examples")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-minutes", type=float, default=34.0,
                   help="hard stop of the training loop (the checkpoint is saved anyway; 0 = none)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end the loop after this many steps, keeping the --steps LR schedule (0 = none)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--tokenizer-chars", type=int, default=6_000_000, help="corpus chars for BPE training")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return p.parse_args(argv)


class Data:
    """Token streams + copy/edit example pool; deterministic given the seed."""

    def __init__(self, tokenizer, args, rng: random.Random):
        self.args, self.rng = args, rng
        texts = [read_text(f) for f in stdlib_files("train")]
        t0 = time.time()
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.stream = np.fromiter((t for ids in enc for t in ids + [EOS_ID]), dtype=np.int32)
        held = [read_text(f) for f in stdlib_files("heldout")]
        henc = tokenizer(held, add_special_tokens=False)["input_ids"]
        self.heldout_stream = np.fromiter((t for ids in henc for t in ids + [EOS_ID]), dtype=np.int32)
        n_pool = max(4000, int(args.steps * args.batch_size * args.copy_frac * 2.5))
        prompts, answers = [], []
        while len(prompts) < n_pool:
            ex = make_edit_example(texts[rng.randrange(len(texts))], rng, max_chars=500)
            if ex:
                prompts.append(ex[0])
                answers.append(ex[1])
        penc = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        aenc = tokenizer(answers, add_special_tokens=False)["input_ids"]
        self.pool = [(p + a, len(p)) for p, a in zip(penc, aenc) if len(p) + len(a) <= args.seq_len]
        held_ex = []
        hrng = random.Random(args.seed + 99)
        while len(held_ex) < 64:
            ex = make_edit_example(held[hrng.randrange(len(held))], hrng, max_chars=500)
            if ex:
                p_ids = tokenizer(ex[0], add_special_tokens=False)["input_ids"]
                a_ids = tokenizer(ex[1], add_special_tokens=False)["input_ids"]
                if len(p_ids) + len(a_ids) <= args.seq_len:
                    held_ex.append((p_ids + a_ids, len(p_ids)))
        self.heldout_pool = held_ex
        print(f"data: {len(self.stream):,} train tokens, {len(self.heldout_stream):,} held-out tokens, "
              f"{len(self.pool):,} copy/edit examples (mean {np.mean([len(x) for x, _ in self.pool]):.0f} "
              f"tokens), tokenized in {time.time() - t0:.1f}s", flush=True)

    def _copy_seq(self, pool, rng):
        S = self.args.seq_len
        seq, spans = [], []
        while len(seq) < S:
            ids, plen = pool[rng.randrange(len(pool))]
            spans.append((len(seq) + plen, len(seq) + len(ids)))
            seq += ids
        return seq[:S], spans

    def _block_starts(self, spans, rng):
        S, bs = self.args.seq_len, self.args.block_size
        starts = []
        for _ in range(self.args.blocks_per_seq):
            good = [(a, b) for a, b in spans if a <= S - bs]
            if good and rng.random() < 0.85:
                a, b = rng.choice(good)
                # The first block of an answer starts at its first token (the AR seed); later ones
                # anywhere inside the answer (LinearSpec blocks start wherever acceptance ended).
                p = a if rng.random() < 0.3 else rng.randint(a, max(a, min(b - 2, S - bs)))
            else:
                p = rng.randint(1, S - bs)
            starts.append(p)
        return starts

    def _mask(self, rng):
        bs = self.args.block_size
        u = rng.random()
        if u < 0.45:  # LinearSpec draft / first FastDiffuser step: everything after the seed
            m = [False] + [True] * (bs - 1)
        elif u < 0.75:  # FastDiffuser later steps: a random subset, denser toward the end
            r = rng.random()
            m = [False] + [rng.random() < min(1.0, r * (0.5 + i / bs)) for i in range(1, bs)]
        else:  # left-to-right progress: the first k positions known
            k = rng.randint(1, bs - 2)
            m = [i > k for i in range(bs)]
        if not any(m):
            m[bs - 1] = True
        return m

    def batch(self, diffusion: bool, heldout: bool = False, rng=None):
        a, rng = self.args, rng or self.rng
        S, bs = a.seq_len, a.block_size
        stream = self.heldout_stream if heldout else self.stream
        pool = self.heldout_pool if heldout else self.pool
        seqs, all_starts = [], []
        for _ in range(a.batch_size):
            if rng.random() < a.copy_frac:
                seq, spans = self._copy_seq(pool, rng)
            else:
                off = rng.randrange(0, len(stream) - S)
                seq, spans = stream[off : off + S].tolist(), []
            seqs.append(seq)
            all_starts.append(self._block_starts(spans, rng))
        clean = torch.tensor(seqs, dtype=torch.long)
        if not diffusion:
            return clean, None, None, None, None
        starts = torch.tensor(all_starts, dtype=torch.long)
        idx = starts[:, :, None] + torch.arange(bs)
        targets = torch.gather(clean[:, None, :].expand(-1, idx.shape[1], -1), 2, idx)
        masked = torch.tensor([[self._mask(rng) for _ in range(a.blocks_per_seq)] for _ in seqs])
        noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
        return clean, starts, noisy, masked, targets


@torch.no_grad()
def evaluate(model, data, device, n_batches=3):
    """Held-out AR loss and diffusion loss / draft accuracy with fully masked blocks."""
    model.eval()
    rng = random.Random(4321)
    saved = data._mask
    data._mask = lambda r: [False] + [True] * (data.args.block_size - 1)
    ar_l, d_l, acc1, acc_all = [], [], [], []
    for _ in range(n_batches):
        clean, starts, noisy, masked, targets = data.batch(True, heldout=True, rng=rng)
        clean, starts, noisy, masked, targets = (t.to(device) for t in (clean, starts, noisy, masked, targets))
        ar, diff = joint_loss(model, clean, starts, noisy, masked, targets, data.args.block_size)
        ar_l.append(ar.item())
        d_l.append(diff.item())
        from sglang_nemodiff.tools.training import block_attention_mask
        B, K, bs = noisy.shape
        S = clean.shape[1]
        ids = torch.cat([clean, noisy.reshape(B, -1)], 1)
        pos = torch.cat([torch.arange(S, device=device).expand(B, S),
                         (starts[:, :, None] + torch.arange(bs, device=device)).reshape(B, -1)], 1)
        logits = model(ids, pos, block_attention_mask(S, starts, bs))[:, S:].reshape(B, K, bs, -1)
        logits[..., MASK_ID] = -1e9
        ok = logits.argmax(-1) == targets
        acc1.append(ok[:, :, 1].float().mean().item())
        acc_all.append(ok[:, :, 1:].float().cumprod(-1).sum(-1).mean().item())
    data._mask = saved
    model.train()
    return {"ar": float(np.mean(ar_l)), "diff": float(np.mean(d_l)), "draft_acc1": float(np.mean(acc1)),
            "draft_run": float(np.mean(acc_all))}


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    prog = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def save_checkpoint(model, tokenizer, config, args, history, evals, train_seconds, out):
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    dtype = getattr(torch, args.save_dtype)
    save_file(model.hf_state_dict(dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    raw = config_json(config)
    raw["torch_dtype"] = args.save_dtype
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": EOS_ID, "do_sample": False}, f, indent=2)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    curve = "\n".join(f"| {s} | {ar:.3f} | {'' if d is None else f'{d:.3f}'} |" for s, ar, d in history)
    ev = "\n".join(f"| {k} | {v['ar']:.3f} | {v['diff']:.3f} | {v['draft_acc1']:.3f} | {v['draft_run']:.2f} |"
                   for k, v in evals.items())
    c = config
    card = f"""# nld-tiny: the bundled Nemotron-Labs Diffusion test model

A {n_params / 1e6:.2f}M-parameter model with the Nemotron-Labs Diffusion (NLD) architecture and real
HF checkpoint layout, trained by this project (`launch/train_bundled_model.py`) so that the plugin
can be served and measured end to end without downloading a real NLD checkpoint. It is a toy: it
writes Python-ish text and copies/edits code snippets; it is not a useful language model.

- Architecture: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} query heads /
  {c.num_key_value_heads} KV heads, head_dim {c.head_dim}, intermediate {c.intermediate_size}, vocab
  {c.vocab_size}, YaRN RoPE {json.dumps(c.rope_parameters)}, untied `diffusion_head`.
- Tokens: byte-level BPE (`sglang_nemodiff.tokenizer.build_tokenizer`), mask id {c.mask_token_id},
  EOS {EOS_ID} `<|im_end|>`, chat template `<|im_start|>role ... <|im_end|>`; block size {c.block_size}.
- Weights stored as {args.save_dtype}.

## Recipe
- Data: Python {sys.version.split()[0]} standard-library sources (sorted selection, every 10th file
  held out), plus generated copy/edit examples in the chat format (a snippet, an instruction such as
  rename / fix typo / repeat / change number / delete line, then the snippet restated with the
  change); {args.copy_frac:.0%} of training sequences are packed copy/edit examples.
- {args.ar_steps} steps plain AR (next-token CE), then {args.steps_done - args.ar_steps} steps (of {args.steps - args.ar_steps} scheduled) of
  `L = L_AR + {args.diffusion_weight} * L_diffusion`. Diffusion: {args.blocks_per_seq} noisy {args.block_size}-token
  blocks per sequence `[seed, x1..x31]` (seed clean, others masked: 45% all masked, 30% random
  ratio denser to the end, 25% left-to-right prefix known), attending bidirectionally to themselves
  and to the clean causal prefix before them; CE on masked positions against the token at the same
  position.
- Batch {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr} (cosine to {args.min_lr_frac}x,
  warmup {args.warmup}), weight decay {args.weight_decay}, seed {args.seed};
  {train_seconds / 60:.1f} min on {args.device_used} ({args.threads} thread(s)).

Flags: `{args.command}`

## Loss curve (training batches, EMA)
| step | L_AR | L_diffusion |
|---|---|---|
{curve}

## Held-out evaluation (fully masked blocks)
| when | L_AR | L_diffusion | draft acc pos 1 | mean leading correct drafts |
|---|---|---|---|---|
{ev}

Tokens per forward of each mode: see `docs/perf-bundled.md`.
"""
    if getattr(args, "parent_card", None):
        # Continued training: keep the first phase's card, append this phase.
        phase = card.split("## Recipe", 1)[1].replace("\nTokens per forward of each mode: see `docs/perf-bundled.md`.\n", "")
        parent = args.parent_card.replace("\nTokens per forward of each mode: see `docs/perf-bundled.md`.\n", "")
        card = (parent.rstrip() + "\n\n## Continued training from the previous phase (no AR-only phase)"
                + phase.replace("\n## ", "\n### ") + "\nTokens per forward of each mode: see `docs/perf-bundled.md`.\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def train_base(argv, label=None):
    """One base phase (AR warm start + joint AR/diffusion) with the given flags."""
    a = parse_base_args(argv)
    a.command = label or ("python launch/train_bundled_model.py base " + " ".join(argv))
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          (a.device if a.device != "auto" else "cpu"))
    a.device_used = str(device) if device.type != "cuda" else torch.cuda.get_device_name(0)
    t_start = time.time()

    # Tokenizer: BPE on the (deterministic) first characters of the training files.
    def corpus():
        budget = a.tokenizer_chars
        for f in stdlib_files("train"):
            t = read_text(f)
            yield t[:budget]
            budget -= len(t)
            if budget <= 0:
                return
    if a.init_from:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(a.init_from)
    else:
        tokenizer = build_tokenizer(corpus(), vocab_size=a.vocab_size)
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == MASK_ID and tokenizer.eos_token_id == EOS_ID
    print(f"tokenizer: vocab {len(tokenizer)} in {time.time() - t_start:.1f}s", flush=True)
    data = Data(tokenizer, a, random.Random(a.seed))

    config = NemotronLabsDiffusionConfig(
        vocab_size=len(tokenizer), hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim, max_position_embeddings=8192, rope_parameters=dict(ROPE), mask_token_id=MASK_ID,
        eos_token_id=EOS_ID, block_size=a.block_size, tie_word_embeddings=False)
    if a.init_from:
        from safetensors.torch import load_file
        with open(os.path.join(a.init_from, "config.json")) as f:
            raw = json.load(f)
        for k in ("model_type", "torch_dtype", "transformers_version"):
            raw.pop(k, None)
        config = NemotronLabsDiffusionConfig(**raw)
        model = NLDTrainModel(config)
        state = load_file(os.path.join(a.init_from, "model.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        with open(os.path.join(a.init_from, "README.md")) as f:
            a.parent_card = f.read()
        print(f"continuing from {a.init_from}", flush=True)
    else:
        model = NLDTrainModel(config)
        model.init_weights(a.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, device {a.device_used}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    history, evals = [], {}
    ema_ar = ema_d = None
    t_train = time.time()
    tokens_seen = 0
    bar = tqdm(range(a.steps), desc="train", mininterval=5, file=sys.stdout)
    for step in bar:
        if a.stop_after and step >= a.stop_after:
            print(f"--stop-after: stopping at step {step} of {a.steps}", flush=True)
            a.steps_done = step
            break
        if a.max_minutes and time.time() - t_train > a.max_minutes * 60:
            print(f"time limit: stopping at step {step} of {a.steps}", flush=True)
            a.steps_done = step
            break
        diffusion = step >= a.ar_steps
        if step == a.ar_steps:
            evals[f"after AR phase (step {step})"] = evaluate(model, data, device)
            print(f"eval {step}: {evals[f'after AR phase (step {step})']}", flush=True)
        clean, starts, noisy, masked, targets = data.batch(diffusion)
        if diffusion:
            starts, noisy, masked, targets = (t.to(device) for t in (starts, noisy, masked, targets))
        clean = clean.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        ar, diff = joint_loss(model, clean, starts, noisy, masked, targets, a.block_size, a.diff_pos_decay)
        loss = ar if diff is None else ar + a.diffusion_weight * diff
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += clean.numel()
        ema_ar = ar.item() if ema_ar is None else 0.9 * ema_ar + 0.1 * ar.item()
        if diff is not None:
            ema_d = diff.item() if ema_d is None else 0.9 * ema_d + 0.1 * diff.item()
        bar.set_postfix(ar=f"{ema_ar:.3f}", diff="-" if ema_d is None else f"{ema_d:.3f}")
        if (step + 1) % a.log_every == 0 or step == a.steps - 1:
            history.append((step + 1, ema_ar, ema_d))
            el = time.time() - t_train
            print(f"step {step + 1}: L_AR {ema_ar:.3f} L_diff {'-' if ema_d is None else f'{ema_d:.3f}'} "
                  f"lr {lr_at(step, a):.2e} {tokens_seen / el:.0f} tok/s {el / 60:.1f} min", flush=True)
    else:
        a.steps_done = a.steps
    train_seconds = time.time() - t_train
    evals[f"final (step {a.steps_done})"] = evaluate(model, data, device)
    print("\nloss curve (EMA of training batches):\n step   L_AR   L_diff")
    for s, ar_v, d_v in history:
        print(f"{s:5d} {ar_v:6.3f} {'' if d_v is None else f'{d_v:6.3f}'}")
    for k, v in evals.items():
        print(f"held-out {k}: {v}")
    save_checkpoint(model.cpu(), tokenizer, config, a, history, evals, train_seconds, a.out)
    check_checkpoint(a.out)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"saved {a.out} ({size / 1e6:.1f} MB), trained {train_seconds / 60:.1f} min, "
          f"{tokens_seen:,} clean tokens, total {(time.time() - t_start) / 60:.1f} min", flush=True)
    return {"out": a.out, "train_seconds": train_seconds, "seconds": time.time() - t_start}


# --------------------------------------------------------------------------------------------
# Stage 3: self-distilled draft LoRA
# --------------------------------------------------------------------------------------------

# The two base phases of the recipe (flags of `train_base`).
BASE1_FLAGS = ["--max-minutes", "0"]
BASE2_FLAGS = ["--ar-steps", "0", "--steps", "220", "--stop-after", "163", "--max-minutes", "0",
               "--copy-frac", "1.0", "--lr", "2e-3", "--warmup", "10", "--diffusion-weight", "0.5",
               "--diff-pos-decay", "0.5", "--seed", "1", "--log-every", "20"]
CHECKPOINT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sglang_nemodiff/bundled/nld-tiny")
    p.add_argument("--work-dir", default="/tmp/nld-tiny-train", help="intermediate checkpoints (base phases)")
    p.add_argument("--stages", default="base1,base2,distill")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g = p.add_argument_group("distill (draft LoRA)")
    g.add_argument("--base", default=None, help="base checkpoint to distill (default: <work-dir>/base)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-prompts", type=int, default=2000, help="training-corpus prompts to continue greedily")
    g.add_argument("--gen-tokens", type=int, default=160, help="greedy tokens generated per prompt")
    g.add_argument("--gen-batch", type=int, default=64)
    g.add_argument("--rank", type=int, default=128)
    g.add_argument("--alpha", type=float, default=256.0)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--steps", type=int, default=3200)
    g.add_argument("--seqs-per-step", type=int, default=8)
    g.add_argument("--blocks-per-seq", type=int, default=8)
    g.add_argument("--tau", type=float, default=8.0, help="block position j weighted exp(-(j-1)/tau)")
    g.add_argument("--reach", type=float, default=0.0,
                   help="> 0: weight position j by P(drafts before j all right) + reach * exp(-(j-1)/tau)")
    g.add_argument("--first-block-frac", type=float, default=0.1,
                   help="share of blocks seeded at the first generated token")
    g.add_argument("--eval-every", type=int, default=400)
    g.add_argument("--val-prompts", type=int, default=16, help="validation prompts per set (training files)")
    g.add_argument("--no-heldout-report", action="store_true",
                   help="skip the held-out LinearSpec figures in the log and card (reporting only)")
    return p.parse_args(argv)


def load_train_model(path, device):
    from safetensors.torch import load_file

    from sglang_nemodiff.tools.training import NLDTrainModel

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    for k in ("model_type", "torch_dtype", "transformers_version"):
        raw.pop(k, None)
    model = NLDTrainModel(NemotronLabsDiffusionConfig(**raw))
    state = load_file(os.path.join(path, "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval().requires_grad_(False)


def distill_stage(a, device):
    from transformers import PreTrainedTokenizerFast

    from sglang_nemodiff.tools.distill import (
        DraftLoRA, LinearSpecEval, build_prompts, greedy_generate, train_draft_lora, validation_prompts)
    from sglang_nemodiff.tools.training import heldout_prompt_sets, stdlib_files

    t_start = time.time()
    base = a.base or os.path.join(a.work_dir, "base")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    model = load_train_model(base, device)
    c = model.config
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    # Training files only: a tenth of them (never used for prompts) gives the validation prompts.
    files = stdlib_files("train")
    val_files = [f for i, f in enumerate(files) if i % 10 == 5]
    prompt_files = [f for i, f in enumerate(files) if i % 10 != 5]
    prompts, kinds = build_prompts(prompt_files, tokenizer, a.n_prompts, random.Random(a.seed))
    t0 = time.time()
    data = greedy_generate(model, prompts, a.gen_tokens, EOS_ID, batch_size=a.gen_batch, kinds=kinds,
                           progress=lambda d, n: print(f"  generated {d}/{n}", flush=True) if d % 512 == 0 or d == n else None)
    gen_seconds = time.time() - t0
    stats = {k: (sum(1 for s in data if s.kind == k), sum(len(s.tokens) - s.prompt_len for s in data if s.kind == k))
             for k in dict.fromkeys(kinds)}
    n_gen = sum(n for _, n in stats.values())
    print(f"distill data: {len(data)} greedy continuations, {n_gen:,} generated tokens in {gen_seconds:.0f}s; "
          + ", ".join(f"{k}: {n} prompts / {t:,} tokens" for k, (n, t) in stats.items()), flush=True)
    t0 = time.time()
    val = {k: LinearSpecEval(model, p, b, EOS_ID, MASK_ID, c.block_size)
           for k, (p, b) in validation_prompts(val_files, tokenizer, a.val_prompts, seed=a.seed + 1).items()}
    held = {}
    if not a.no_heldout_report:
        for k, ps in heldout_prompt_sets(tokenizer).items():
            held[k] = LinearSpecEval(model, [p.input_ids for p in ps], [p.max_new_tokens for p in ps], EOS_ID,
                                     MASK_ID, c.block_size)
    print(f"evaluation sets built in {time.time() - t0:.0f}s", flush=True)

    def evaluate(lora):
        info = {}
        for name, sets in (("val", val), ("heldout", held)):
            for k, ev in sets.items():
                r = ev(model, lora)
                info[f"{name}_{k}"] = (r["tpf"], r["accepted"])
        score = sum(info[f"val_{k}"][0] for k in val) / len(val)
        return score, info

    def log(row):
        print(f"step {row['step']:5d} {row['minutes']:5.1f} min loss "
              f"{'-' if row['loss'] is None else format(row['loss'], '.3f')} | "
              + " | ".join(f"{k} TPF {v[0]:.2f} acc {v[1]:.2f}" for k, v in row.items() if isinstance(v, tuple)),
              flush=True)

    lora = DraftLoRA(c.num_hidden_layers, c.num_attention_heads * c.head_dim, c.hidden_size, a.rank, a.alpha,
                     seed=a.seed).to(device)
    t0 = time.time()
    best_state, best_step, history = train_draft_lora(
        model, lora, data, steps=a.steps, seqs_per_step=a.seqs_per_step, blocks_per_seq=a.blocks_per_seq,
        lr=a.lr, warmup=a.warmup, tau=a.tau, reach=a.reach, mask_id=MASK_ID, block_size=c.block_size, seed=a.seed,
        evaluate=evaluate, eval_every=a.eval_every, first_block_frac=a.first_block_frac, log=log)
    train_seconds = time.time() - t0
    lora.load_state_dict(best_state)
    os.makedirs(a.out, exist_ok=True)
    if os.path.abspath(base) != os.path.abspath(a.out):
        import shutil

        for name in CHECKPOINT_FILES:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), os.path.join(a.out, name))
    lora.save(os.path.join(a.out, "linear_spec_lora"))
    return {"history": history, "best_step": best_step, "gen_seconds": gen_seconds, "train_seconds": train_seconds,
            "seconds": time.time() - t_start, "stats": stats, "n_gen": n_gen, "base": base,
            "n_params": sum(p.numel() for p in lora.parameters())}


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def write_card(a, device_name, stage_seconds, d):
    """README.md of the final checkpoint: the base phases' card (written by `save_checkpoint`) and
    the distillation stage."""
    with open(os.path.join(d["base"], "README.md")) as f:
        base_card = f.read()
    # The base phases' card: architecture bullets, then the per-phase recipe, curves and evaluations.
    arch = base_card[base_card.index("- Architecture:") : base_card.index("## Recipe")].rstrip()
    base_body = base_card[base_card.index("## Recipe") :].replace(
        "\nTokens per forward of each mode: see `docs/perf-bundled.md`.\n", "\n")
    base_body = base_body.replace("\n## ", "\n### ").replace("## Recipe", "### Stage 1: base model", 1)
    base_body = base_body.replace("### Continued training from the previous phase", "### Stage 2: continued training")
    rows = []
    for r in d["history"]:
        cells = [str(r["step"]), f"{r['minutes']:.1f}", "" if r["loss"] is None else f"{r['loss']:.3f}"]
        for k in ("val_continuation", "val_edit", "heldout_continuation", "heldout_edit"):
            cells.append(f"{r[k][0]:.2f} / {r[k][1]:.2f}" if k in r else "")
        rows.append("| " + " | ".join(cells) + " |")
    best = next(r for r in d["history"] if r["step"] == d["best_step"])
    held_c, held_e = (f"{best[k][0]:.2f} ({best[k][1]:.2f} accepted drafts per block)" if k in best else "n/a"
                      for k in ("heldout_continuation", "heldout_edit"))
    stats = ", ".join(f"{k} {n} prompts / {t:,} tokens" for k, (n, t) in d["stats"].items())
    total = sum(stage_seconds.values())
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_seconds.items())
    card = f"""# nld-tiny: the bundled Nemotron-Labs Diffusion model

A 3.8M-parameter model with the Nemotron-Labs Diffusion (NLD) architecture and the real HF
checkpoint layout (weights + `linear_spec_lora/` draft adapter), trained from scratch by
`launch/train_bundled_model.py` so that the plugin can be served and measured end to end without
downloading a real NLD checkpoint. It is a toy language model of Python source code: it continues
Python code in the style of the standard library and answers copy/edit requests in the chat format
with a fenced code block. Its text is Python-shaped but often repetitive or wrong; what it is good
for is exercising the three generation modes on a CPU: LinearSpec's self-distilled draft makes it
produce the same tokens as AR in fewer forwards, and FastDiffuser denoising with the same adapter
(`denoise_lora: true`) fills several positions per pass.

{arch}
- Draft-only LoRA (`linear_spec_lora/`, PEFT layout): `o_proj` of every layer, rank {a.rank}, alpha
  {a.alpha:g}; used by LinearSpec's draft pass and, with `denoise_lora: true`, by FastDiffuser's
  denoise passes; never by a causal pass.

## Tokens per forward on the held-out sets

LinearSpec on the held-out sets of `launch/measure_modes.py` with the shipped adapter (replayed from
the draft acceptance, equal to the reference's LinearSpec): continuation {held_c}, edit {held_e}
tokens per forward. All modes: `python launch/measure_modes.py --backend reference`
(`docs/perf-bundled.md`).

## Recipe

One command, fixed seeds, {a.threads} torch thread(s) on {device_name}: `{a.command}`
({total / 60:.1f} min in total: {times}).

Stages 1 and 2 train the base weights; stage 3 trains only the draft-only LoRA, so AR and
LinearSpec (equal to AR at temperature 0) produce the base model's tokens.

{base_body.rstrip()}

### Stage 3: self-distilled draft LoRA (LinearSpec)
- Data: {len(d['history']) and ''}{a.n_prompts} prompts from the training files (none of the held-out files;
  a tenth of the training files is kept apart for validation): {stats}. `cont` = a 64-256-token window of a
  file, `def` = a file up to a `def`/`class` header, `head` = a bare header line, `edit` = a copy/edit
  task. The base model continues each greedily for up to {a.gen_tokens} tokens (batched, KV cache;
  {d['n_gen']:,} tokens in {d['gen_seconds'] / 60:.1f} min); the causal KV of every sequence is kept.
- Objective: blocks `[seed, MASK x 31]` seeded anywhere in the generated part ({a.first_block_frac:.0%} at its
  first token), attending bidirectionally to themselves and to the cached causal prefix; CE of the
  draft logits (mask id excluded) toward the greedy tokens, block position j weighted exp(-(j-1)/{a.tau:g}).
  Forward and backward run over the blocks only (the prefix KV is the base model's, untouched by the LoRA).
- LoRA on `o_proj` of every layer, rank {a.rank}, alpha {a.alpha:g} ({d['n_params']:,} parameters, stored fp32),
  B initialised to zero. AdamW lr {a.lr:g} (warm-up {a.warmup} steps, cosine to 2%), no weight decay,
  {a.steps} steps of {a.seqs_per_step} sequences x {a.blocks_per_seq} blocks; {d['train_seconds'] / 60:.1f} min including
  evaluations.
- Validation every {a.eval_every} steps: LinearSpec's exact tokens per forward on {a.val_prompts} + {a.val_prompts}
  validation prompts shaped like the held-out sets (a 192-token file window with 128 new tokens; a
  copy/edit task with 160), replayed from the draft acceptance at every greedy position. The shipped
  adapter is the one with the best mean validation TPF: step {d['best_step']}.

Distillation curve (TPF / mean accepted drafts per block; held-out columns are the held-out sets of
`launch/measure_modes.py`, reported only, never used for selection):

| step | minutes | loss | val continuation | val edit | held-out continuation | held-out edit |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(card)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["base"]:
        train_base(argv[1:])
        return
    a = parse_args(argv)
    a.command = "python launch/train_bundled_model.py " + " ".join(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          (a.device if a.device != "auto" else "cpu"))
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    stages = a.stages.split(",")
    common = ["--device", str(device.type), "--threads", str(a.threads)]
    phase1, base = os.path.join(a.work_dir, "phase1"), os.path.join(a.work_dir, "base")
    times = {}
    t0 = time.time()
    if "base1" in stages:
        train_base(BASE1_FLAGS + common + ["--out", phase1], label=" ".join(BASE1_FLAGS))
        times["stage 1"] = time.time() - t0
    if "base2" in stages:
        t0 = time.time()
        train_base(BASE2_FLAGS + common + ["--init-from", phase1, "--out", base], label=" ".join(BASE2_FLAGS))
        times["stage 2"] = time.time() - t0
    if "distill" in stages:
        t0 = time.time()
        d = distill_stage(a, device)
        times["stage 3"] = time.time() - t0
        write_card(a, device_name, times, d)
        check_checkpoint(a.out)
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
        print(f"saved {a.out} ({size / 1e6:.1f} MB); best validation step {d['best_step']}", flush=True)
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f"; total {sum(times.values()) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
