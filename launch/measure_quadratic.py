#!/usr/bin/env python
"""Tokens per forward of AR, LinearSpec and quadratic self-speculation (dense and sparse), by
block size, from the plain-PyTorch oracle (sglang_nemodiff.reference): greedy, prefill counted,
every output checked == AR. Hardware-independent (forwards are counted, not timed); the served
mode spends the oracle's forwards (tests/test_serve_quadratic.py), so these are its figures too.

    python launch/measure_quadratic.py --model bundled     # nld-tiny, 8 held-out code prompts
    python launch/measure_quadratic.py --model smol        # SmolLM2 in NLD form, 24 held-out chats
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def prompts_for(model: str, path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if model == "smol":
        from sglang_nemodiff.tools.chat_prompts import chat_ids, heldout_prompts

        return [chat_ids(tokenizer, p) for p in heldout_prompts()], tokenizer.eos_token_id
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    sets = heldout_prompt_sets(tokenizer, n_per_set=4, continuation_tokens=96)
    return [p.input_ids for p in sets["continuation"] + sets["edit"]], 11


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("bundled", "smol"), default="bundled")
    ap.add_argument("--block-sizes", default="8,16,32")
    ap.add_argument("--groups", default="", help="sparse quadratic group counts, e.g. 1,2,4")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=0, help="the first N prompts only (0: all)")
    ap.add_argument("--linearspec-adapter", action="store_true",
                    help="quadratic rounds with the LinearSpec adapter (not the checkpoint's quadratic_lora)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sglang_nemodiff.reference import NLDReference, ar_generate, linearspec_generate, quadratic_generate

    if args.model == "smol":
        from sglang_nemodiff.bundled.smol import smol_model_path

        path = smol_model_path()
    else:
        from sglang_nemodiff.bundled import bundled_model_path

        path = bundled_model_path()
    model = NLDReference.from_pretrained(path)
    # the adapter the quadratic mode runs (checkpoint.adapter_dir: quadratic_lora/ when present)
    quadratic_model = NLDReference.from_pretrained(path, quadratic=not args.linearspec_adapter)
    prompts, eos = prompts_for(args.model, path)
    prompts = prompts[: args.prompts or None]
    n = args.max_new_tokens
    ar = [ar_generate(model, ids, n, eos_id=eos) for ids in prompts]
    tokens = sum(len(r.tokens) for r in ar)
    print(f"{args.model}: {len(prompts)} prompts, greedy, up to {n} new tokens, prefill counted\n")
    print("| b | mode | query tokens / request / forward | tokens / forward | accepted / round | vs LinearSpec |")
    print("|---|---|---|---|---|---|")
    from sglang_nemodiff.quadratic_layout import QuadraticLayout, group_size

    def mean_accepted(runs):
        rounds = [a for r in runs for a in r.accept_lengths]
        return sum(rounds) / max(len(rounds), 1)

    group_counts = [int(x) for x in args.groups.split(",") if x.strip()]
    for b in (int(x) for x in args.block_sizes.split(",")):
        lin = [linearspec_generate(model, ids, n, eos, block_size=b) for ids in prompts]
        assert [r.tokens for r in lin] == [r.tokens for r in ar], "output differs from AR"
        lin_tpf = tokens / sum(r.forwards for r in lin)
        print(f"| {b} | LinearSpec | {b} | {lin_tpf:.2f} | {mean_accepted(lin):.2f} | 1.00x |", flush=True)
        g = group_size(b, model.config.shift_logits)
        for k in [None] + [k for k in group_counts if k < b]:
            quad = [quadratic_generate(quadratic_model, ids, n, eos, block_size=b, groups=k)
                    for ids in prompts]
            assert [r.tokens for r in quad] == [r.tokens for r in ar], "output differs from AR"
            quad_tpf = tokens / sum(r.forwards for r in quad)
            name = "quadratic" if k is None else f"sparse quadratic, {k} group{'s' * (k > 1)}"
            print(f"| {b} | {name} | {QuadraticLayout(b, g, k).tokens} | {quad_tpf:.2f} | "
                  f"{mean_accepted(quad):.2f} | {quad_tpf / lin_tpf:.2f}x |", flush=True)
    print(f"\nAR: {tokens} tokens, {sum(r.forwards for r in ar)} forwards; every output == AR's")


if __name__ == "__main__":
    main()
