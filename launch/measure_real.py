#!/usr/bin/env python
"""Tokens per forward of SmolLM2-135M-Instruct in NLD form on held-out chat prompts, served.

One server per entry, one after another, each bound to one core: AR, LinearSpec at fixed block
sizes, FastDiffuser with the draft adapter on its denoise passes. Every request is greedy and goes
through the chat template; forwards (prefill included) come from meta_info. Prints a markdown
table: tokens per forward, accepted drafts per block, tokens equal to AR's (position by position),
and the cost of one forward on this machine by query tokens: on the same server, one request at a
time (64 tokens, EOS ignored), wall time / forwards, so SGLang's per-round work is included.

    python launch/measure_real.py --out docs/perf-real-tpf.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_ENTRIES = ("ar,linearspec@block_size=4,linearspec@block_size=8,linearspec@block_size=16,"
                   "linearspec@block_size=32,fastdiffuser@denoise_lora=true")


def main() -> None:
    import requests

    from sglang_nemodiff.bundled.smol import smol_model_path
    from sglang_nemodiff.servers import ManagedServer
    from sglang_nemodiff.speedbench.modes import parse_entry, write_algorithm_config
    from sglang_nemodiff.tools.chat_prompts import chat_ids, heldout_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", default=DEFAULT_ENTRIES)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--core", default="1", help="SGLANG_CPU_OMP_THREADS_BIND for every server")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from transformers import AutoTokenizer

    path = smol_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [chat_ids(tokenizer, t) for t in heldout_prompts()]
    work = tempfile.mkdtemp(prefix="measure-real-")
    rows, ar_tokens = [], None
    for text in args.entries.split(","):
        entry = parse_entry(text)
        config = write_algorithm_config(entry, work)
        extra = ["--algorithm-config", config] if config else []
        server = ManagedServer(path, entry.algorithm, ["--sleep-on-idle", *extra],
                               log_path=os.path.join(work, f"{entry.file_stem}.log"),
                               env={**os.environ, "SGLANG_CPU_OMP_THREADS_BIND": args.core})
        server.start()
        try:
            server.wait_ready(timeout=600)

            def ask(ids):
                r = requests.post(server.url + "/generate", timeout=1200, json={
                    "input_ids": ids, "sampling_params": {"temperature": 0,
                                                          "max_new_tokens": args.max_new_tokens}})
                r.raise_for_status()
                return r.json()

            started = time.time()
            with ThreadPoolExecutor(args.concurrency) as pool:
                out = list(pool.map(ask, prompts))
            seconds = time.time() - started
            costs = []
            for _ in range(3):  # the minimum of three single requests: the machine's noise is one-sided
                t0 = time.time()
                r = requests.post(server.url + "/generate", timeout=1200, json={
                    "input_ids": prompts[0], "sampling_params": {
                        "temperature": 0, "max_new_tokens": 64, "ignore_eos": True}}).json()
                info = r["meta_info"]
                n_fwd = (info.get("nemodiff_forwards") or [info["completion_tokens"]])[-1]
                costs.append((time.time() - t0) / n_fwd)
            cost_ms = 1000 * min(costs)
        finally:
            server.stop()
        tokens = [o["output_ids"] for o in out]
        n_tokens = sum(len(t) for t in tokens)

        def meta(o, key):
            value = o["meta_info"].get(key)
            return value[-1] if isinstance(value, list) else value

        forwards = sum(meta(o, "nemodiff_forwards") or len(o["output_ids"]) for o in out)
        blocks = [meta(o, "nemodiff_blocks") for o in out]
        accept = [meta(o, "nemodiff_accept_length") for o in out]
        acc_drafts = None
        if entry.algorithm == "linearspec" and all(b for b in blocks):
            # accept length = accepted drafts + 1 (the bonus), per block, averaged over blocks
            acc_drafts = sum((a - 1) * b for a, b in zip(accept, blocks)) / sum(blocks)
        if entry.algorithm == "ar":
            ar_tokens = tokens
        same = identical = None
        if ar_tokens is not None:
            same = sum(x == y for t, a in zip(tokens, ar_tokens) for x, y in zip(t, a))
            identical = sum(t == a for t, a in zip(tokens, ar_tokens))
        rows.append((entry.label, n_tokens, forwards, acc_drafts, same, identical, seconds, cost_ms))
        print(rows[-1], flush=True)

    lines = [f"Held-out chat prompts: {len(prompts)} (sglang_nemodiff/tools/chat_prompts.py "
             f"heldout_prompts), greedy, max_new_tokens {args.max_new_tokens}, "
             f"{args.concurrency} at a time; {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             "one bound core per server.", "",
             "| mode | tokens | forwards | tokens / forward | accepted drafts / block | "
             "tokens equal to AR's | answers identical to AR's | ms per forward (1 request) |",
             "|---|---|---|---|---|---|---|---|"]
    ar_total = rows[0][1]
    for label, n, f, acc, same, identical, _, cost in rows:
        lines.append(f"| {label} | {n} | {f} | {n / f:.2f} | "
                     f"{'' if acc is None else f'{acc:.2f}'} | "
                     f"{'' if same is None else f'{same}/{ar_total} ({100 * same / ar_total:.1f}%)'} | "
                     f"{'' if identical is None else f'{identical}/{len(prompts)}'} | {cost:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
