#!/usr/bin/env python
"""Forward time of the reference NLD model by query tokens and pass kind, eager and under one CUDA
graph per query-token count, at NLD-8B shapes with random bf16 weights (a GPU with ~20 GB free).

Pass kinds (reference/model.py `forward_structured`: the attention pattern and the draft-adapter
rows are tensors the forward reads, so one captured graph replays every kind):
- verify: causal block, base weights;
- draft: block-bidirectional with the seed row causal, adapter on the other rows;
- quadratic: the b(b+1) layout (reference/quadratic.py) when the query-token count is b(b+1).
Each replay is checked against the eager forward of the same kind (max abs error in the table).
The cached prefix is `--context` random committed tokens. CUDA events, warm-up, median.

    python launch/gpu_forward_bench.py --out forward.md        # on a GPU
    python launch/gpu_forward_bench.py --smoke                 # logic check on the CPU, tiny model
    python launch/gpu_forward_bench.py --model-path DIR --context 256 --iters 5   # a real
        checkpoint (fp32, eager) on this machine: what a forward costs here by query tokens

Needs torch only (and this repository's `sglang_nemodiff.reference`; no SGLang).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QUERY_TOKENS = (1, 16, 32, 64, 272, 1056)  # 272 = 16 x 17, 1056 = 32 x 33: quadratic b = 16, 32


# NLD-8B (config.py REAL_CONFIGS) for machines without transformers (a lent GPU has torch and
# Triton only); plain RoPE, which costs what YaRN costs.
TORCH_ONLY_8B = dict(vocab_size=131072, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=34, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, rms_norm_eps=1e-5, mask_token_id=100, tie_word_embeddings=False,
                     shift_logits=False, causal_seed=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def nld_config(smoke: bool):
    try:
        from sglang_nemodiff.config import NemotronLabsDiffusionConfig, real_config
    except ImportError:  # torch only
        from types import SimpleNamespace

        if smoke:
            raise
        return SimpleNamespace(**TORCH_ONLY_8B)
    if smoke:
        from sglang_nemodiff.checkpoint import TINY_CONFIG

        return NemotronLabsDiffusionConfig(**TINY_CONFIG)
    try:
        return real_config("8B")
    except Exception as e:  # another transformers major version: same shapes without it
        print(f"NLD config through transformers failed ({e!r}); torch-only config", flush=True)
        from types import SimpleNamespace

        return SimpleNamespace(**TORCH_ONLY_8B)


def build_model(config, device, dtype, lora_rank: int, seed: int = 0):
    from sglang_nemodiff.reference import NLDReference

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = NLDReference(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "norm":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    from sglang_nemodiff.reference.model import yarn_inv_freq_and_scale

    inv_freq, model.rope_scale = yarn_inv_freq_and_scale(model.head_dim, config.rope_parameters)
    model.inv_freq = inv_freq.to(device)
    width = model.n_heads * model.head_dim
    model.draft_lora = [(0.02 * torch.randn(lora_rank, width, device=device, dtype=dtype),
                         0.02 * torch.randn(config.hidden_size, lora_rank, device=device, dtype=dtype))
                        for _ in range(config.num_hidden_layers)]
    model.draft_lora_scale = 1.0
    return model.eval()


def pass_inputs(kind: str, T: int, device):
    """(attention pattern [T, T], adapter rows [T] as 0/1) of a pass kind, or None if the kind
    has no layout with T query tokens."""
    from sglang_nemodiff.reference.quadratic import quadratic_layout

    if kind == "verify":
        return torch.ones(T, T, dtype=torch.bool, device=device).tril(), torch.zeros(T, dtype=torch.bool, device=device)
    if kind == "draft":
        allowed = torch.ones(T, T, dtype=torch.bool, device=device)
        allowed[0, 1:] = False
        rows = torch.ones(T, dtype=torch.bool, device=device)
        rows[0] = False
        return allowed, rows
    b = int((T ** 0.5))
    if b * (b + 1) != T:
        return None
    _, allowed, is_mask = quadratic_layout(b, b, device)
    return allowed, is_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", default=None, help="comma-separated query-token counts")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model-path", default=None, help="a real checkpoint, float32 (default: random "
                                                      "NLD-8B-shaped weights)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sglang_nemodiff.reference.model import KVCache

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    config = nld_config(args.smoke)
    if args.smoke:
        dtype, context = torch.float32, 24
        tokens, iters = (1, 6, 20), args.iters or 2
        name = "CPU smoke run (tiny model; numbers mean nothing)"
    else:
        dtype, context = torch.bfloat16, args.context
        tokens, iters = QUERY_TOKENS, args.iters or 20
        name = torch.cuda.get_device_name() if cuda else "CPU"
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.model_path:
        from sglang_nemodiff.reference import NLDReference

        dtype = torch.float32
        model = NLDReference.from_pretrained(args.model_path, device=device).eval()
        config = model.config
        name = f"{name}, {os.path.basename(os.path.normpath(args.model_path))}"
    else:
        model = build_model(config, device, dtype, lora_rank=16 if args.smoke else 64)
    gen = torch.Generator(device="cpu").manual_seed(1)
    cache = KVCache()
    prefix = torch.randint(0, config.vocab_size, (context,), generator=gen).to(device)
    cache.append(model.forward_structured(prefix, None, torch.arange(context, device=device),
                                          torch.ones(context, context, dtype=torch.bool, device=device).tril())[1])

    def timed(fn):
        for _ in range(3):
            fn()
        samples = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(samples)

    rows = []
    for T in tokens:
        ids = torch.randint(0, config.vocab_size, (T,), generator=gen).to(device)
        positions = torch.arange(context, context + T, device=device)
        kinds = [k for k in ("verify", "draft", "quadratic") if pass_inputs(k, T, device) is not None]
        static_allowed, static_rows = (t.clone() for t in pass_inputs("verify", T, device))

        def run():
            return model.forward_structured(ids, cache, positions, static_allowed, static_rows)[0]

        graph = out = None
        if cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
        for kind in kinds:
            allowed, draft_rows = pass_inputs(kind, T, device)
            static_allowed.copy_(allowed)
            static_rows.copy_(draft_rows)
            eager_ms = timed(run)
            eager = run()
            graph_ms = err = None
            if graph is not None:
                graph_ms = timed(graph.replay)
                graph.replay()
                err = (out.float() - eager.float()).abs().max().item()
            rows.append((T, kind, eager_ms, graph_ms, err))
            print(f"T={T} {kind}: eager {eager_ms:.3f} ms" + (f", graph {graph_ms:.3f} ms, err {err:.2e}"
                                                              if graph_ms is not None else ""), flush=True)
    lines = [f"Reference NLD forward by query tokens ({name}; "
             f"{'its weights, fp32' if args.model_path else 'NLD-8B shapes, bf16, random weights' if not args.smoke else 'tiny config'}, "
             f"{context} cached tokens, median of {iters}; {time.strftime('%Y-%m-%d')})", "",
             "| query tokens | pass | eager ms | CUDA graph ms | graph vs eager max abs err |",
             "|---|---|---|---|---|"]
    for T, kind, eager_ms, graph_ms, err in rows:
        lines.append(f"| {T} | {kind} | {eager_ms:.3f} | "
                     f"{'n/a (no CUDA)' if graph_ms is None else f'{graph_ms:.3f}'} | "
                     f"{'-' if err is None else f'{err:.2e}'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
