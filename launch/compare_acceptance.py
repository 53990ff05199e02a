"""Accepted drafts per LinearSpec block at temperature > 0, two exact acceptance rules, on the
bundled model's held-out prompts (plain-PyTorch reference, no server):

- speculative sampling (what the server runs): drafts sampled from the draft pass's q, draft i
  accepted with probability min(1, p_i(x)/q_i(x)) against the verify pass's p_i;
- the HF reference's rule: drafts sampled from q, an AR token sampled from p_i independently,
  draft accepted while the two are equal.

Both emit AR's distribution; the first accepts more. The chain is run as a real LinearSpec
generation (the speculative rule's output continues the context), T and top-p as given.

    python launch/compare_acceptance.py --temperature 0.7 --top-p 0.9
"""

from __future__ import annotations

import argparse

import torch

from sglang_nemodiff.algorithms.sampling import filtered_probs
from sglang_nemodiff.kernels.speculative import speculative_accept_reference
from sglang_nemodiff.reference.model import KVCache


def probs(logits, temperature, top_p, mask_id=None):
    logits = logits.float().clone()
    if mask_id is not None:
        logits[:, mask_id] = float("-inf")
    n = logits.shape[0]
    return filtered_probs(logits, torch.full((n,), temperature), torch.full((n,), logits.shape[-1], dtype=torch.int64),
                          torch.full((n,), top_p), torch.zeros(n))


def run(model, prompt, new_tokens, temperature, top_p, gen):
    mask_id, device = model.config.mask_token_id, model.diffusion_head.weight.device
    cache = KVCache()
    logits, kv = model(torch.tensor(prompt, device=device), cache, causal=True)
    cache.append(kv)
    seed = int(torch.multinomial(probs(logits[-1:], temperature, top_p)[0], 1, generator=gen))
    spec, hf, blocks, emitted = 0, 0, 0, 0
    while emitted < new_tokens:
        block = torch.full((32,), mask_id, device=device)
        block[0] = seed
        draft_logits, _ = model(block, cache, causal=False, use_draft_lora=True)
        q = probs(draft_logits[1:], temperature, top_p, mask_id)
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
        block[1:] = drafts
        verify_logits, kv = model(block, cache, causal=True)
        p = probs(verify_logits, temperature, top_p)
        u = torch.rand(32, generator=gen)
        accepted, bonus = speculative_accept_reference(drafts[None], q[None], p[None], u[None, :31], u[None, 31])
        a = int(accepted[0])
        ar = torch.multinomial(p[:31], 1, generator=gen)[:, 0]  # the HF rule's independent AR samples
        hf += int((ar == drafts).long().cumprod(0).sum())
        spec += a
        blocks += 1
        cache.append(kv, count=a + 1)
        emitted += a + 1
        seed = int(bonus[0])
    return spec, hf, blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="per held-out set")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.reference import NLDReference
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    path = bundled_model_path()
    model = NLDReference.from_pretrained(path)
    sets = heldout_prompt_sets(AutoTokenizer.from_pretrained(path), n_per_set=a.prompts)
    gen = torch.Generator().manual_seed(a.seed)
    print(f"T={a.temperature} top_p={a.top_p}, {a.new_tokens} new tokens, bundled model, reference")
    print("| set | blocks | speculative: accepted drafts/block | HF rule: accepted drafts/block |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name, prompts in sets.items():
            spec = hf = blocks = 0
            for p in prompts:
                s, h, b = run(model, p.input_ids, a.new_tokens, a.temperature, a.top_p, gen)
                spec, hf, blocks = spec + s, hf + h, blocks + b
            print(f"| {name} | {blocks} | {spec / blocks:.2f} | {hf / blocks:.2f} |")


if __name__ == "__main__":
    main()
