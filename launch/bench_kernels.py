#!/usr/bin/env python
"""Benchmark the NLD Triton kernels on a CUDA GPU at NLD-8B shapes.

Structured-mask attention (Hq 32, Hkv 8, D 128, bf16; prefix 1k/4k/16k; 32 causal, 32
block-bidirectional, 64 causal new tokens; batch 1 and 8) against
* torch SDPA with a dense bool mask (from ``build_mask``) over pre-gathered, GQA-expanded KV,
* torch SDPA without a mask over the same KV (a lower bound for stock paths; wrong mask),
* the memory floor: bytes that must be read + written once / device copy bandwidth measured in
  this run with a large tensor copy.
The confidence/argmax kernel at N = 32/256/1024 rows (1, 8, 32 blocks of 32), V = 131072 (bf16
logits) against torch softmax + max and the floor of reading the logits once.

Every timed case is first checked against the PyTorch reference (max abs error in the table).
CUDA events, warmup, median; the L2 cache is flushed before each timed call (``--no-flush`` to
keep it warm). Prints one markdown table; ``--out FILE`` writes it too.

Self-contained: needs only torch, triton and ``sglang_nemodiff.kernels`` (no sglang).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_kernels():
    """Import sglang_nemodiff.kernels; if the parent package cannot be imported here (e.g. its
    __init__ needs packages this machine lacks), load the kernels subpackage on its own."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        from sglang_nemodiff import kernels  # noqa: F401

        return kernels
    except ImportError:
        for name in [m for m in sys.modules if m == "sglang_nemodiff" or
                     m.startswith("sglang_nemodiff.")]:
            del sys.modules[name]
        pkg_dir = os.path.join(REPO, "sglang_nemodiff")
        parent = types.ModuleType("sglang_nemodiff")
        parent.__path__ = [pkg_dir]
        sys.modules["sglang_nemodiff"] = parent
        kdir = os.path.join(pkg_dir, "kernels")
        spec = importlib.util.spec_from_file_location(
            "sglang_nemodiff.kernels", os.path.join(kdir, "__init__.py"),
            submodule_search_locations=[kdir])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sglang_nemodiff.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per case")
    ap.add_argument("--warmup", type=int, default=None, help="warmup iterations per case")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between calls")
    ap.add_argument("--splits", type=int, default=None,
                    help="force the attention kernel's prefix split count (default: auto)")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-confidence", action="store_true")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="logic check of this script on the CPU (Triton interpreter, tiny shapes, "
                         "wall-clock timing); its numbers mean nothing")
    return ap.parse_args()


def main():
    args = _parse()
    smoke = args.smoke_cpu
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not smoke and not torch.cuda.is_available():
        sys.exit("bench_kernels.py: no CUDA device available (torch.cuda.is_available() is "
                 "False). This benchmark times Triton kernels on a GPU; run it on a CUDA machine.")
    if not smoke and os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_kernels.py: TRITON_INTERPRET=1 is set; unset it to benchmark on the GPU.")
    import torch.nn.functional as F
    import triton

    K = _import_kernels()
    dev = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    iters = args.iters or (1 if smoke else 10 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 3 if args.quick else 10)
    flush_buf = None if (args.no_flush or smoke) else torch.empty(256 << 20, dtype=torch.uint8,
                                                                 device=dev)

    def bench(fn):
        """Median time (µs) of fn() with CUDA events."""
        for _ in range(warmup):
            fn()
        if smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            if flush_buf is not None:
                flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        return statistics.median(times)

    # ---- device copy bandwidth (read + write bytes / time), same run
    nbytes = (1 << 24) if smoke else (1 << 30)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b_ = torch.empty_like(a)
    a.fill_(1)
    saved = flush_buf
    flush_buf = None
    copy_us = bench(lambda: b_.copy_(a))
    flush_buf = saved
    bw = 2 * nbytes / (copy_us * 1e-6)  # bytes / s
    del a, b_
    if not smoke:
        torch.cuda.empty_cache()
        props = torch.cuda.get_device_properties(dev)
        dev_name, n_sms = props.name, props.multi_processor_count
    else:
        dev_name, n_sms = "CPU smoke test (Triton interpreter; timings meaningless)", 0
    header = (f"Device: {dev_name} ({n_sms} SMs), torch {torch.__version__}, "
              f"triton {triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s "
              f"({nbytes >> 20} MiB copy, {copy_us:.0f} µs); "
              f"median of {iters} calls after {warmup} warmup; "
              f"L2 {'kept warm' if args.no_flush else 'flushed before each call'}.")
    print(header, flush=True)
    rows = []
    cols = ["kernel", "case", "ours µs", "baseline", "baseline µs", "baseline/ours",
            "SDPA no mask µs", "floor µs", "ours/floor", "max abs err"]

    def add(*vals):
        rows.append([str(v) for v in vals])
        print(" | ".join(rows[-1]), flush=True)

    # ---------------------------------------------------------------- structured attention
    if not args.skip_attention:
        Hq, Hkv, D = (8, 2, 16) if smoke else (32, 8, 128)
        G = Hq // Hkv
        dtype = torch.bfloat16
        sm_scale = D ** -0.5
        prefixes = [40] if smoke else [1024, 4096] if args.quick else [1024, 4096, 16384]
        batches = [1, 2] if smoke else [1] if args.quick else [1, 8]
        cases = [(32, K.CAUSAL, "causal"), (32, K.BLOCK_BIDIRECTIONAL, "bidir"),
                 (64, K.CAUSAL, "causal")]
        for P in prefixes:
            for B in batches:
                for Q, kind, kname in cases:
                    T = B * Q
                    ctx = P + Q
                    num_slots = B * ctx + 64
                    # shuffled token slots: the prefix is read through a non-contiguous table
                    perm = torch.randperm(num_slots, device=dev)[: B * ctx].view(B, ctx)
                    req_to_token = perm.to(torch.int32).contiguous()
                    req_pool_indices = torch.arange(B, device=dev, dtype=torch.int64)
                    prefix_lens = torch.full((B,), P, dtype=torch.int32, device=dev)
                    extend_lens = torch.full((B,), Q, dtype=torch.int32, device=dev)
                    extend_start = torch.arange(0, T, Q, dtype=torch.int32, device=dev)
                    q = torch.randn(T, Hq, D, device=dev, dtype=dtype)
                    k_new = torch.randn(T, Hkv, D, device=dev, dtype=dtype)
                    v_new = torch.randn(T, Hkv, D, device=dev, dtype=dtype)
                    k_cache = torch.randn(num_slots, Hkv, D, device=dev, dtype=dtype)
                    v_cache = torch.randn(num_slots, Hkv, D, device=dev, dtype=dtype)
                    out = torch.empty_like(q)
                    kw = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache,
                              req_to_token=req_to_token, req_pool_indices=req_pool_indices,
                              prefix_lens=prefix_lens, extend_start_loc=extend_start,
                              extend_lens=extend_lens, mask_kind=kind, sm_scale=sm_scale)

                    def ours():
                        K.structured_attention(**kw, out=out, max_extend_len=Q,
                                               max_prefix_len=P, num_splits=args.splits)

                    # correctness first (fp32 reference)
                    out.fill_(float("nan"))
                    ours()
                    ref = K.structured_attention_reference(**kw)
                    err = (out.float() - ref.float()).abs().max().item()
                    del ref

                    # SDPA baselines over gathered, GQA-expanded, contiguous KV (gather not timed)
                    slots = req_to_token[:, :P].long()
                    kk = torch.cat([k_cache[slots], k_new.view(B, Q, Hkv, D)], 1)
                    vv = torch.cat([v_cache[slots], v_new.view(B, Q, Hkv, D)], 1)
                    kk = kk.repeat_interleave(G, 2).transpose(1, 2).contiguous()  # [B,Hq,ctx,D]
                    vv = vv.repeat_interleave(G, 2).transpose(1, 2).contiguous()
                    qq = q.view(B, Q, Hq, D).transpose(1, 2).contiguous()
                    mask = K.build_mask(kind, P, Q, device=dev)[None, None]
                    dense_us = bench(lambda: F.scaled_dot_product_attention(
                        qq, kk, vv, attn_mask=mask, scale=sm_scale))
                    nomask_us = bench(lambda: F.scaled_dot_product_attention(
                        qq, kk, vv, scale=sm_scale))
                    del kk, vv, qq, mask
                    ours_us = bench(ours)

                    el = 2  # bf16
                    floor_bytes = (T * Hq * D * el * 2  # q read, o written
                                   + T * Hkv * D * el * 2  # new k, v
                                   + B * P * Hkv * D * el * 2  # prefix k, v
                                   + B * P * 4)  # req_to_token entries
                    floor_us = floor_bytes / bw * 1e6
                    if args.splits is not None:
                        ns = args.splits
                    else:
                        _, base = K.attention_launch_shape(dtype, Hq, Hkv, D, B, Q,
                                                           interpret=smoke)
                        ns = 1 if smoke else K.plan_num_splits(base, P, n_sms)
                    add("attention", f"P={P} Q={Q} {kname} B={B} splits={ns}",
                        f"{ours_us:.1f}", "SDPA dense mask", f"{dense_us:.1f}",
                        f"{dense_us / ours_us:.2f}x", f"{nomask_us:.1f}", f"{floor_us:.1f}",
                        f"{ours_us / floor_us:.1f}x", f"{err:.2e}")
                    del q, k_new, v_new, k_cache, v_cache, out, req_to_token, perm
                    if not smoke:
                        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- confidence / argmax
    if not args.skip_confidence:
        V, mask_id = (3000, 100) if smoke else (131072, 100)
        for N in ([3, 7] if smoke else [32, 1024] if args.quick else [32, 256, 1024]):
            logits = (torch.randn(N, V, device=dev) * 4).to(torch.bfloat16)
            logits[0, mask_id] = 100.0  # the mask id is the max of row 0
            tok, prob = K.confidence_argmax(logits, mask_id)
            rtok, rprob = K.confidence_argmax_reference(logits, mask_id)
            mism = int((tok != rtok).sum())
            err = (prob - rprob).abs().max().item()

            def torch_path():
                p = torch.softmax(logits.float(), dim=-1)
                p[:, mask_id] = -1.0
                return p.max(dim=-1)

            base_us = bench(torch_path)
            ours_us = bench(lambda: K.confidence_argmax(logits, mask_id))
            floor_us = N * V * 2 / bw * 1e6
            add("confidence", f"N={N} V={V} bf16" + (f" ({mism} token mismatches)" if mism else ""),
                f"{ours_us:.1f}", "torch softmax+max", f"{base_us:.1f}",
                f"{base_us / ours_us:.2f}x", "-", f"{floor_us:.1f}",
                f"{ours_us / floor_us:.1f}x", f"{err:.2e}")

    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = header + "\n\n" + "\n".join(table) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
