"""Train the draft adapter of SmolLM2-135M-Instruct in NLD form (one command, fixed seeds):

    taskset -c 1 python launch/train_smol_draft.py            # ~70 min on one core of this CPU

Stages (cached in --work, so a rerun resumes after the last finished one):
1. greedy chat answers of the model to the training prompts and to the held-out prompts
   (sglang_nemodiff/tools/chat_prompts.py: template prompts, nothing downloaded);
2. one causal teacher pass per sequence (committed KV + top-k next-token distributions);
3. adapter training for --minutes (o_proj LoRA, AR weights frozen), held-out teacher-forced
   acceptance every few minutes; the best adapter is written to --out with train_log.json
   (the curve of estimated tokens per forward vs minutes).
Exact held-out LinearSpec tokens per forward: launch/measure_real.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "sglang_nemodiff", "bundled", "smol-draft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "sglang_nemodiff", "smol-distill"))
    parser.add_argument("--n-prompts", type=int, default=0, help="0: all training prompts")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tau", type=float, default=4.0)
    parser.add_argument("--eval-every", type=float, default=5.0, help="minutes")
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-slot", choices=("causal", "bidirectional"), default="causal",
                        help="how the draft pass runs the seed row (config.py: causal_seed)")
    parser.add_argument("--init", default=None,
                        help="continue from this adapter directory (PEFT layout) instead of a new one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    from transformers import AutoTokenizer

    from sglang_nemodiff.bundled.smol import smol_model_path
    from sglang_nemodiff.reference import NLDReference
    from sglang_nemodiff.tools import distill_chat as dc
    from sglang_nemodiff.tools.chat_prompts import chat_ids, heldout_prompts, train_prompts
    from sglang_nemodiff.tools.convert import llama_from_nld

    started = time.time()

    def log(msg):
        print(f"[{(time.time() - started) / 60:6.1f} min] {msg}", flush=True)

    base = smol_model_path(with_draft=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = json.load(open(os.path.join(base, "config.json")))
    eos, mask_id = config["eos_token_id"], config["mask_token_id"]
    os.makedirs(args.work, exist_ok=True)
    answers_path = os.path.join(args.work, f"answers-{args.n_prompts}-{args.max_new_tokens}.pkl")
    if os.path.exists(answers_path):
        train_seqs, held_seqs = pickle.load(open(answers_path, "rb"))
        log(f"answers from {answers_path}")
    else:
        hf = llama_from_nld(base)
        train_text = train_prompts(args.n_prompts or None, seed=args.seed)
        log(f"generating answers to {len(train_text)} training prompts")
        train_seqs = dc.generate_answers(hf, tokenizer, [chat_ids(tokenizer, p) for p in train_text],
                                         args.max_new_tokens, eos, log=log)
        held_text = heldout_prompts()
        log(f"generating answers to {len(held_text)} held-out prompts")
        held_seqs = dc.generate_answers(hf, tokenizer, [chat_ids(tokenizer, p) for p in held_text],
                                        args.max_new_tokens, eos, log=log)
        pickle.dump((train_seqs, held_seqs), open(answers_path, "wb"))
        del hf
    n_tokens = sum(len(s.tokens) - s.prompt_len for s in train_seqs)
    log(f"{len(train_seqs)} training answers ({n_tokens} tokens), {len(held_seqs)} held-out")
    model = dc.freeze(NLDReference.from_pretrained(base))
    t0 = time.time()
    dc.teacher_pass(model, train_seqs + held_seqs)
    log(f"teacher pass {time.time() - t0:.0f} s")
    causal_seed = args.seed_slot == "causal"
    evals = dc.eval_batches(held_seqs, args.block_size, mask_id, args.eval_blocks, seed=args.seed + 1,
                            causal_seed=causal_seed)
    lora = dc.new_adapter(model, args.rank, args.seed)
    if args.init:
        dc.load_adapter(lora, args.init)
        log(f"continuing from {args.init}")
    best, history = dc.train(model, lora, train_seqs, evals, minutes=args.minutes,
                             blocks_per_step=args.blocks_per_step, block_size=args.block_size,
                             lr=args.lr, tau=args.tau, mask_id=mask_id, seed=args.seed,
                             eval_every_minutes=args.eval_every, causal_seed=causal_seed, log=log)
    lora.load_state_dict(best)
    lora.save(args.out, dtype=torch.bfloat16)  # what ships: half the size, same drafts to within rounding
    previous = None
    if args.init and os.path.exists(os.path.join(args.init, "train_log.json")):
        previous = json.load(open(os.path.join(args.init, "train_log.json")))
    record = {"args": vars(args), "continued_from": previous, "train_answers": len(train_seqs), "train_answer_tokens": n_tokens,
              "heldout_answers": len(held_seqs), "history": history,
              "total_minutes": round((time.time() - started) / 60, 1)}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(f"adapter written to {args.out}")


if __name__ == "__main__":
    main()
