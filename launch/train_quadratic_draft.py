#!/usr/bin/env python
"""Self-distil a draft adapter for the quadratic mode (`quadratic_lora/`), one command, fixed seeds:

    taskset -c 1 python launch/train_quadratic_draft.py          # nld-tiny: ~10 min, one core

Why a second adapter: LinearSpec drafts a block knowing its first token (the bonus, committed by
the verify pass before the draft pass), but a quadratic round drafts the next block in the same
forward that verifies the current one, so each draft group stands at the bonus's position without
knowing it (quadratic_layout.py). An adapter distilled for LinearSpec's blocks drafts those
groups poorly; this one is trained on exactly that layout (tools/distill.py `block_batch(...,
quadratic=True)`: the committed prefix up to d_i, the group's masks from the bonus's position on,
targets the model's own greedy tokens, the bonus slot unweighted), starting from the checkpoint's
LinearSpec adapter. AR weights stay frozen: every mode's output is unchanged (quadratic == AR
still holds); only its tokens per forward move. The quadratic mode loads `quadratic_lora/` when
a checkpoint has one (checkpoint.py `adapter_dir`), else the LinearSpec adapter.

Selection: teacher-forced accepted drafts per 16-token group on validation continuations (from the
training files' validation tenth, never the held-out sets), every --eval-every steps; the best is
written with train_log.json. Exact tokens per forward on held-out prompts: launch/measure_quadratic.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def main() -> None:
    from sglang_nemodiff.bundled import bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=bundled_model_path(), help="NLD checkpoint (unshifted drafts)")
    ap.add_argument("--out", default=None, help="default: <model>/quadratic_lora")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--n-prompts", type=int, default=1000, help="training-corpus prompts continued greedily")
    ap.add_argument("--gen-tokens", type=int, default=160)
    ap.add_argument("--block-size", type=int, default=16, help="b the groups are trained for")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=8.0, help="group slot j weighted exp(-(j-1)/tau)")
    ap.add_argument("--bonus-weight", type=float, default=1.0,
                    help="weight of a group's slot 0 (the bonus's position: its draft is replaced)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from safetensors.torch import load_file
    from train_bundled_model import EOS_ID, MASK_ID, load_train_model
    from transformers import PreTrainedTokenizerFast

    from sglang_nemodiff.checkpoint import LINEAR_SPEC_ADAPTER, QUADRATIC_ADAPTER
    from sglang_nemodiff.tools import distill as dc
    from sglang_nemodiff.tools.training import stdlib_files

    started = time.time()
    out = a.out or os.path.join(a.model, QUADRATIC_ADAPTER)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(a.model)
    model = load_train_model(a.model, "cpu")
    c = model.config
    if c.shift_logits:
        raise SystemExit("shifted-draft checkpoints: not supported by this recipe yet")
    init = os.path.join(a.model, LINEAR_SPEC_ADAPTER)
    with open(os.path.join(init, "adapter_config.json")) as f:
        cfg = json.load(f)
    lora = dc.DraftLoRA(c.num_hidden_layers, c.num_attention_heads * c.head_dim, c.hidden_size,
                        cfg["r"], cfg["lora_alpha"])
    weights = load_file(os.path.join(init, "adapter_model.safetensors"))
    with torch.no_grad():
        for i in range(c.num_hidden_layers):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            lora.A[i].copy_(weights[f"{key}.lora_A.weight"])
            lora.B[i].copy_(weights[f"{key}.lora_B.weight"])

    # Training files only; their validation tenth (as in the bundled model's recipe) selects.
    files = stdlib_files("train")
    val_files = [f for i, f in enumerate(files) if i % 10 == 5]
    prompt_files = [f for i, f in enumerate(files) if i % 10 != 5]
    prompts, kinds = dc.build_prompts(prompt_files, tokenizer, a.n_prompts, random.Random(a.seed))
    data = dc.greedy_generate(model, prompts, a.gen_tokens, EOS_ID, batch_size=64, kinds=kinds)
    val_prompts, _ = dc.build_prompts(val_files, tokenizer, 48, random.Random(a.seed + 1))
    val = [s for s in dc.greedy_generate(model, val_prompts, a.gen_tokens, EOS_ID, batch_size=48)
           if len(s.tokens) - s.prompt_len >= 4]
    gen_minutes = (time.time() - started) / 60
    print(f"{len(data)} greedy continuations, {len(val)} validation ones, {gen_minutes:.1f} min", flush=True)

    def batches(quadratic: bool):
        rng, out_batches = random.Random(3), []
        for j in range(0, len(val), 16):
            seqs = val[j:j + 16] * 4  # 4 groups per sequence, one per row
            seeds = dc.sample_blocks(seqs, 1, rng, a.block_size)
            out_batches.append(dc.block_batch(seqs, seeds, 1, MASK_ID, a.block_size, "cpu",
                                              quadratic=quadratic))
        return out_batches

    groups, blocks = batches(True), batches(False)

    def evaluate(candidate):
        quad = dc.acceptance(model, candidate, groups, MASK_ID)
        lin = dc.acceptance(model, candidate, blocks, MASK_ID)
        return quad["accepted"], {"quadratic_accepted": quad["accepted"], "quadratic_first": quad["acc1"],
                                  "linearspec_accepted": lin["accepted"]}

    def log(row):
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    best, best_step, history = dc.train_draft_lora(
        model, lora, data, steps=a.steps, seqs_per_step=8, blocks_per_seq=8, lr=a.lr, warmup=20,
        tau=a.tau, mask_id=MASK_ID, block_size=a.block_size, seed=a.seed, evaluate=evaluate,
        eval_every=a.eval_every, log=log, quadratic=True, slot0_weight=a.bonus_weight)
    lora.load_state_dict(best)
    lora.save(out)
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"args": vars(a), "init": LINEAR_SPEC_ADAPTER, "best_step": best_step,
                   "generation_minutes": round(gen_minutes, 1),
                   "total_minutes": round((time.time() - started) / 60, 1), "history": history}, f, indent=1)
    print(f"best step {best_step}; wrote {out} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
