#!/usr/bin/env python
"""Measure tokens per forward and tokens/s of AR, FastDiffuser and LinearSpec on held-out prompts.

Two deterministic held-out prompt sets (sglang_nemodiff.tools.training.heldout_prompt_sets), built from
standard-library files the bundled model never saw:
  continuation  a held-out file's prefix; continue it
  edit          copy/edit tasks whose answer restates text given in the prompt
Every forward is counted (prefill and FastDiffuser's refresh included). Greedy (temperature 0).

Backends:
  --backend reference   sglang_nemodiff.reference generate functions in this process
  --backend server      one `python -m sglang.launch_server ... --algorithm MODE` per mode, back to
                        back; greedy /generate requests with input_ids; forwards read from
                        meta_info (nemodiff_forwards / nemodiff_tokens_per_forward /
                        nemodiff_accept_length); the server is always killed.

    python launch/measure_modes.py --backend reference --out docs/perf-bundled.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("ar", "fastdiffuser", "fastdiffuser+lora", "linearspec")
# "fastdiffuser+lora": FastDiffuser whose denoise passes use the draft adapter (`denoise_lora: true`)
FASTDIFFUSER_LORA = "fastdiffuser+lora"
SETS = ("continuation", "edit")


@dataclass
class Run:
    tokens: list[int]
    forwards: float | None  # None: not reported
    seconds: float
    accept_lengths: list[float] = field(default_factory=list)  # accepted drafts, one per block
    forwards_inferred: bool = False
    block_sizes: dict[int, int] = field(default_factory=dict)  # block size -> blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="checkpoint dir (default: the bundled model)")
    p.add_argument("--backend", choices=["reference", "server"], default="reference")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--n-prompts", type=int, default=8, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="continuation budget (edit prompts get +32 so a whole restatement fits)")
    p.add_argument("--threshold", type=float, default=0.9, help="FastDiffuser confidence threshold (reference)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (reference backend)")
    p.add_argument("--device", default="cpu", help="reference backend device")
    p.add_argument("--port", type=int, default=0, help="server port (0: pick a free one)")
    p.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for /health_generate")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--server-args", default="", help="extra arguments appended to launch_server")
    p.add_argument("--out", default=None, help="write the markdown report here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------


def run_reference(model_path, prompts_by_set, modes, args):
    import torch

    from sglang_nemodiff.reference.generate import ar_generate, fastdiffuser_generate, linearspec_generate
    from sglang_nemodiff.reference.model import NLDReference

    torch.set_num_threads(args.threads)
    model = NLDReference.from_pretrained(model_path, dtype=torch.float32, device=args.device)
    eos = model.config.eos_token_id
    block = model.config.block_size
    fns = {
        "ar": lambda ids, n: ar_generate(model, ids, n, eos_id=eos),
        "fastdiffuser": lambda ids, n: fastdiffuser_generate(model, ids, n, eos_id=eos, block_size=block,
                                                             threshold=args.threshold),
        FASTDIFFUSER_LORA: lambda ids, n: fastdiffuser_generate(model, ids, n, eos_id=eos, block_size=block,
                                                                threshold=args.threshold, use_draft_lora=True),
        "linearspec": lambda ids, n: linearspec_generate(model, ids, n, eos_id=eos, block_size=block),
    }
    results = {}
    for mode in modes:
        for set_name, prompts in prompts_by_set.items():
            runs = []
            for p in prompts:
                t0 = time.perf_counter()
                r = fns[mode](p.input_ids, p.max_new_tokens)
                runs.append(Run(r.tokens, r.forwards, time.perf_counter() - t0, list(r.accept_lengths)))
            results[(set_name, mode)] = runs
            print(f"  {mode:12s} {set_name:12s} done", flush=True)
    return results, f"block size {block}"


def _scalar(value):
    """meta_info values may be scalars or 1-element lists; None when missing/unusable."""
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, (list, tuple)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _block_sizes(value) -> dict[int, int]:
    """meta_info `nemodiff_blocks_per_size` ([{"32": n, ...}]) -> {32: n, ...}."""
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    return {int(b): int(n) for b, n in value.items()} if isinstance(value, dict) else {}


def run_server(model_path, prompts_by_set, modes, args):
    import shlex

    import requests

    from sglang_nemodiff.servers import ManagedServer
    from sglang_nemodiff.speedbench.modes import parse_entry, write_algorithm_config

    results = {}
    config_dir = tempfile.mkdtemp(prefix="measure-modes-")
    for mode in modes:
        log_path = os.path.join(tempfile.gettempdir(), f"measure_{mode}_{os.getpid()}.log")
        server_args = shlex.split(args.server_args)
        entry = parse_entry("fastdiffuser@denoise_lora=true" if mode == FASTDIFFUSER_LORA else mode)
        config = write_algorithm_config(entry, config_dir)
        if config:
            server_args += ["--algorithm-config", config]
        server = ManagedServer(model_path, entry.algorithm, server_args, port=args.port or None,
                               log_path=log_path)
        print(f"  starting server: {shlex.join(server.cmd)} (log {log_path})", flush=True)
        with server:
            server.wait_ready(args.server_timeout, poll=2.0)
            base = server.url
            # Warm-up request (not timed).
            requests.post(base + "/generate", json={"input_ids": [10, 200, 300], "sampling_params":
                          {"temperature": 0, "max_new_tokens": 8}}, timeout=args.request_timeout)
            for set_name, prompts in prompts_by_set.items():
                runs = []
                for p in prompts:
                    t0 = time.perf_counter()
                    resp = requests.post(base + "/generate", json={
                        "input_ids": p.input_ids,
                        "sampling_params": {"temperature": 0, "max_new_tokens": p.max_new_tokens}},
                        timeout=args.request_timeout)
                    seconds = time.perf_counter() - t0
                    resp.raise_for_status()
                    out = resp.json()
                    out = out[0] if isinstance(out, list) else out
                    tokens = list(out.get("output_ids") or [])
                    meta = out.get("meta_info") or {}
                    forwards = _scalar(meta.get("nemodiff_forwards"))
                    if forwards is None:
                        tpf = _scalar(meta.get("nemodiff_tokens_per_forward"))
                        if tpf:
                            forwards = len(tokens) / tpf
                    # nemodiff_accept_length: the request's mean tokens per block, bonus included;
                    # one entry per block of accepted drafts, like the reference's.
                    accept = _scalar(meta.get("nemodiff_accept_length"))
                    blocks = _scalar(meta.get("nemodiff_blocks"))
                    accepts = [accept - 1] * int(blocks) if accept is not None and blocks else []
                    run = Run(tokens, forwards, seconds, accepts,
                              block_sizes=_block_sizes(meta.get("nemodiff_blocks_per_size")))
                    if run.forwards is None and mode == "ar":
                        run.forwards, run.forwards_inferred = len(tokens), True  # one token per forward
                    runs.append(run)
                results[(set_name, mode)] = runs
                print(f"  {mode:12s} {set_name:12s} done", flush=True)
    sizes = sorted({b for runs in results.values() for r in runs for b in r.block_sizes})
    return results, ("block sizes used " + ", ".join(map(str, sizes)) if sizes
                     else "block size not reported")


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def summarize(results, prompts_by_set, modes):
    rows = []
    for set_name, prompts in prompts_by_set.items():
        base = results.get((set_name, "ar"))
        base_tpf = base_tps = None
        for mode in modes:
            runs = results[(set_name, mode)]
            tokens = sum(len(r.tokens) for r in runs)
            seconds = sum(r.seconds for r in runs)
            forwards = None if any(r.forwards is None for r in runs) else sum(r.forwards for r in runs)
            tpf = tokens / forwards if forwards else None
            tps = tokens / seconds if seconds else None
            if mode == "ar":
                base_tpf, base_tps = tpf, tps
            accepts = [a for r in runs for a in r.accept_lengths]
            same = agreement = not_more = None
            if mode == "linearspec" and base is not None:
                flags = [r.tokens == b.tokens for r, b in zip(runs, base)]
                same = f"{sum(flags)}/{len(flags)}"
            if mode.startswith("fastdiffuser") and base is not None:
                # Share of AR's tokens reproduced at the same position, and the prompts that spent
                # no more forwards per token than AR (tokens/forward >= 1; the outputs differ in
                # length, so raw forward counts do not compare).
                agreement = (sum(sum(x == y for x, y in zip(r.tokens, b.tokens)) for r, b in zip(runs, base))
                             / max(1, sum(len(b.tokens) for b in base)))
                if forwards is not None:
                    not_more = f"{sum(len(r.tokens) >= r.forwards for r in runs)}/{len(runs)}"
            rows.append({
                "set": set_name, "mode": mode, "prompts": len(runs), "tokens": tokens,
                "forwards": forwards, "tpf": tpf, "tps": tps,
                "tpf_ratio": tpf / base_tpf if tpf and base_tpf else None,
                "tps_ratio": tps / base_tps if tps and base_tps else None,
                "accept": sum(accepts) / len(accepts) if accepts else None,
                "same": same, "inferred": any(r.forwards_inferred for r in runs),
                "agreement": agreement, "not_more": not_more,
                "per_prompt_same": ([r.tokens == b.tokens for r, b in zip(runs, base)]
                                    if mode == "linearspec" and base is not None else None),
            })
    return rows


def markdown(rows, header_lines):
    out = list(header_lines)
    out += ["", "| set | mode | prompts | tokens | forwards | tokens/forward | tokens/s | TPF ÷ AR | tok/s ÷ AR "
            "| mean accepted drafts/block | LinearSpec == AR | FastDiffuser: AR tokens reproduced "
            "| prompts with tokens/forward ≥ 1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fw = "n/a" if r["forwards"] is None else f"{r['forwards']:.0f}" + ("*" if r["inferred"] else "")
        out.append(f"| {r['set']} | {r['mode']} | {r['prompts']} | {r['tokens']} | {fw} | {_fmt(r['tpf'])} | "
                   f"{_fmt(r['tps'], 1)} | {_fmt(r['tpf_ratio'])} | {_fmt(r['tps_ratio'])} | "
                   f"{_fmt(r['accept'])} | {r['same'] or ''} | "
                   f"{_pct(r['agreement'])} | "
                   f"{r['not_more'] or ''} |")
    per = [r for r in rows if r["per_prompt_same"] is not None]
    if per:
        out += ["", "LinearSpec output == AR output, per prompt:"]
        for r in per:
            out.append(f"- {r['set']}: " + " ".join("yes" if s else "NO" for s in r["per_prompt_same"]))
    if any(r["inferred"] for r in rows):
        out += ["", "\\* AR forwards not reported by the server: taken as one forward per token."]
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) must still run the finally blocks that kill the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from transformers import PreTrainedTokenizerFast

    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    model_path = os.path.abspath(args.model_path or bundled_model_path())
    modes = [m for m in args.modes.split(",") if m]
    if "ar" not in modes:
        modes = ["ar"] + modes  # ratios and the LinearSpec check need the AR baseline
    modes = [m for m in MODES if m in modes]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    prompt_sets = heldout_prompt_sets(tokenizer, n_per_set=args.n_prompts, max_new_tokens=args.max_new_tokens)
    prompt_sets = {k: v for k, v in prompt_sets.items() if k in args.sets.split(",")}
    print(f"model {model_path}; backend {args.backend}; "
          + ", ".join(f"{k}: {len(v)} prompts" for k, v in prompt_sets.items()), flush=True)
    t0 = time.time()
    if args.backend == "reference":
        results, blocks = run_reference(model_path, prompt_sets, modes, args)
    else:
        results, blocks = run_server(model_path, prompt_sets, modes, args)
    rows = summarize(results, prompt_sets, modes)
    cmd = "python launch/measure_modes.py " + " ".join(sys.argv[1:]) if argv is None else str(argv)
    header = [
        f"Model `{os.path.relpath(model_path, os.getcwd()) if model_path.startswith(os.getcwd()) else model_path}`, "
        f"backend `{args.backend}`, greedy (temperature 0), {blocks}"
        + (f", FastDiffuser threshold {args.threshold}" if args.backend == "reference" else "") + ".",
        f"Prompts per set: {args.n_prompts}; max new tokens: continuation {args.max_new_tokens}, "
        f"edit {args.max_new_tokens + 32} (stop at EOS). Tokens per forward counts every forward "
        "(prefill and FastDiffuser's refresh included).",
        f"Machine: {platform.machine()} {os.cpu_count()} CPU(s)"
        + (f", torch threads {args.threads}" if args.backend == "reference" else "")
        + f"; {datetime.date.today().isoformat()}; measured in {time.time() - t0:.0f} s. "
        "Wall-clock tokens/s of a tiny model on a shared CPU is noisy and dominated by per-forward overhead.",
        f"Command: `{cmd}`",
    ]
    md = markdown(rows, header)
    print()
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
