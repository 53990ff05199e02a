"""`python launch/speedbench.py` / `python -m sglang_nemodiff.speedbench`: options and the run."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from typing import Any, Sequence

from sglang_nemodiff.servers import CPU_ARGS, ServerStartError, has_flag, sigterm_exits
from sglang_nemodiff.speedbench.client import (PRECLOSE_TEXT, SCHEDULES, ApiConfig, PromptBuilder, RequestRecord,
                                               batches, load_tokenizer, run_sweep, server_facts)
from sglang_nemodiff.speedbench.data import SPLITS, STANDIN_PATH, SpeedBenchDataError, load_rows, repeat_rows
from sglang_nemodiff.speedbench.modes import ModeEntry, entry_server, parse_entries
from sglang_nemodiff.speedbench.report import aggregate, machine_info, markdown_report, write_reports


def parse_int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speedbench", description="SPEED-Bench throughput of NLD modes (AR measured in the same run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=STANDIN_PATH,
                   help="SPEED-Bench parquet/jsonl file, or a dataset directory (then --split picks the files); "
                        "default: the bundled stand-in prompts")
    d.add_argument("--split", default="qualitative", help=f"split inside a dataset directory: {', '.join(SPLITS)}")
    d.add_argument("--single-turn-only", action="store_true", help="only rows with multiturn=false and one turn")
    d.add_argument("--categories", default=None, help="comma-separated categories to keep")
    d.add_argument("--max-per-category", type=int, default=None, help="keep at most N rows per category")
    d.add_argument("--repeat", type=int, default=1, help="send every row N times (keeps high concurrencies busy)")
    d.add_argument("--preclose-thinking", action="store_true",
                   help="append <think></think> after the chat template's generation prompt (no-thinking runs)")
    d.add_argument("--preclose-text", default=PRECLOSE_TEXT, help=argparse.SUPPRESS)
    d.add_argument("--system-prompt", default=None)
    d.add_argument("--tokenizer", default=None,
                   help="tokenizer (chat template) for generate/completions; default: the model path "
                        "(or the server's /model_info tokenizer_path with --url)")
    d.add_argument("--no-chat-template", action="store_true", help="send raw turns without a chat template")
    s = p.add_argument_group("servers")
    s.add_argument("--url", action="append", default=[], help="already running server (repeatable)")
    s.add_argument("--url-label", action="append", default=[],
                   help="mode name of the --url server at the same position (default: server0, server1, ...)")
    s.add_argument("--model-path", default=None, help="start one server per --algorithms entry for this checkpoint")
    s.add_argument("--algorithms", default="ar,fastdiffuser,linearspec",
                   help="comma-separated entries MODE[@key=value...], e.g. 'ar,linearspec@block_size=32'; "
                        "the pairs go to that server as --algorithm-config FILE")
    s.add_argument("--server-args", default="",
                   help="extra launch_server arguments; when no CUDA GPU is visible, '" + shlex.join(CPU_ARGS)
                        + "' is added for the flags not given; --max-running-requests defaults to the largest "
                          "concurrency")
    s.add_argument("--server-start-timeout", type=float, default=900.0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--launcher", default=None,
                   help="command that starts a server (default: this Python's -m sglang.launch_server)")
    r = p.add_argument_group("load")
    r.add_argument("--api", choices=("generate", "completions", "chat"), default="generate")
    r.add_argument("--concurrency", type=parse_int_list, default=[1, 2, 4, 8, 16, 32])
    r.add_argument("--schedule", choices=SCHEDULES, default="category",
                   help="category: each category's rows run alone at each concurrency; mixed: all rows together")
    r.add_argument("--max-tokens", type=int, default=1024)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    r.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    r.add_argument("--warmup", type=int, default=2, help="unrecorded warm-up requests per server")
    r.add_argument("--interleave", action="store_true",
                   help="start every mode's server at once and run the modes one after another at each "
                        "concurrency, so a machine whose speed drifts over minutes (a shared CPU) drifts "
                        "alike for all of them; needs memory for every server at once (not for large "
                        "models on one GPU)")
    r.add_argument("--passes", type=int, default=1,
                   help="with --interleave: run the whole concurrency sweep N times; a mode's tok/s is "
                        "its tokens over its wall time summed across the passes")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="speedbench_out")
    o.add_argument("--baseline", default="ar", help="mode the ratios are relative to (started first)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--save-text", action="store_true", help="keep generated texts in speedbench_requests.jsonl")
    o.add_argument("--no-progress", action="store_true")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if bool(a.url) == bool(a.model_path):
        p.error("give either --model-path (the harness starts the servers) or --url (running servers), not both")
    if a.url_label and len(a.url_label) != len(a.url):
        p.error(f"{len(a.url_label)} --url-label for {len(a.url)} --url")
    if a.max_tokens < 1 or a.repeat < 1 or a.passes < 1:
        p.error("--max-tokens, --repeat and --passes must be >= 1")
    if a.passes > 1 and not a.interleave:
        p.error("--passes needs --interleave")


class Run:
    """One harness run: rows, load settings, and the records of every server measured so far."""

    def __init__(self, a: argparse.Namespace, rows):
        self.a, self.rows = a, rows
        self.cfg = ApiConfig(api=a.api, max_tokens=a.max_tokens, temperature=a.temperature,
                             ignore_eos=a.ignore_eos, request_timeout=a.request_timeout)
        self.records: list[RequestRecord] = []
        self.walls: dict[tuple[str, int, str], float] = {}
        self.servers: list[dict] = []
        self._tokenizers: dict[str, Any] = {}

    def builder(self, tok_path: str | None) -> PromptBuilder:
        a, tok = self.a, None
        if a.api != "chat" and not a.no_chat_template:
            tok_path = a.tokenizer or tok_path
            if not tok_path:
                raise SystemExit("speedbench: no tokenizer for the chat template: pass --tokenizer PATH "
                                 "(or --no-chat-template, or --api chat)")
            if tok_path not in self._tokenizers:
                try:
                    self._tokenizers[tok_path] = load_tokenizer(tok_path)
                except Exception as e:
                    raise SystemExit(f"speedbench: cannot load the tokenizer (chat template) from {tok_path!r}: "
                                     f"{type(e).__name__}: {e}\npass --tokenizer PATH, --no-chat-template or --api chat")
            tok = self._tokenizers[tok_path]
        return PromptBuilder(tok, a.preclose_thinking, a.preclose_text, a.system_prompt)

    def measure(self, label: str, url: str, tok_path: str | None, server: dict,
                concurrencies: Sequence[int] | None = None, warmup: bool = True) -> None:
        """Run `concurrencies` (default: all) against one server; the first call registers it.
        Wall times add up over calls (passes of an interleaved run)."""
        if server not in self.servers:
            server.update(server_facts(url))
            self.servers.append(server)
        self.cfg.model_name = server.get("model_id") or "default"
        t0 = time.time()
        recs, walls = run_sweep(url, self.cfg, self.builder(tok_path or server.get("tokenizer_path")), self.rows,
                                label, concurrencies or self.a.concurrency, progress=not self.a.no_progress,
                                warmup=self.a.warmup if warmup else 0, schedule=self.a.schedule)
        self.records.extend(recs)
        for (c, name), v in walls.items():
            self.walls[(label, c, name)] = self.walls.get((label, c, name), 0.0) + v
        server["sweep_s"] = round(server.get("sweep_s", 0.0) + time.time() - t0, 2)

    def running_servers(self) -> None:
        for i, url in enumerate(self.a.url):
            label = self.a.url_label[i] if self.a.url_label else f"server{i}"
            self.measure(label, url.rstrip("/"), None, {"label": label, "url": url, "started_by_harness": False})

    def _start(self, entry: ModeEntry, server_args: list[str], stack: contextlib.ExitStack):
        """Start `entry`'s server inside `stack`; (server, meta), or None if it failed to start."""
        a = self.a
        meta = {"label": entry.label, "algorithm": entry.algorithm, "settings": entry.settings,
                "started_by_harness": True}
        srv = entry_server(entry, a.model_path, server_args, a.out_dir, host=a.host,
                           launcher=shlex.split(a.launcher) if a.launcher else None)
        meta["command"] = shlex.join(srv.cmd)
        print(f"speedbench: starting {entry.label}: {meta['command']}", file=sys.stderr)
        try:
            stack.enter_context(srv)
            meta["start_s"] = round(srv.wait_ready(a.server_start_timeout), 2)
        except ServerStartError as e:
            print(f"speedbench: {e}", file=sys.stderr)
            self.servers.append({**meta, "error": str(e)[:2000]})
            return None
        print(f"speedbench: {entry.label} ready after {meta['start_s']:.1f} s", file=sys.stderr)
        return srv, meta

    def started_servers(self, entries: Sequence[ModeEntry], server_args: list[str]) -> None:
        a = self.a
        if not a.interleave:  # one server at a time, every concurrency
            for entry in entries:
                with contextlib.ExitStack() as stack:
                    started = self._start(entry, server_args, stack)
                    if started:
                        self.measure(entry.label, started[0].url, a.model_path, started[1])
            return
        with contextlib.ExitStack() as stack:
            live = [(entry, *started) for entry in entries
                    if (started := self._start(entry, server_args, stack))]
            for p in range(a.passes):
                for c in a.concurrency:
                    for entry, srv, meta in live:
                        self.measure(entry.label, srv.url, a.model_path, meta, [c],
                                     warmup=p == 0 and c == a.concurrency[0])


def _warn_idle_workers(a: argparse.Namespace, rows) -> None:
    smallest = min(len(b) for b in batches(rows, a.schedule).values())
    over = [c for c in a.concurrency if c > smallest]
    if over:
        print(f"speedbench: note: concurrency {over} exceeds the {smallest} rows of the smallest batch "
              f"(schedule {a.schedule}); fewer requests are in flight there (see --schedule mixed, --repeat)",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        rows = load_rows(a.data, a.split, single_turn_only=a.single_turn_only,
                         categories=[c for c in a.categories.split(",") if c] if a.categories else None,
                         max_per_category=a.max_per_category)
        server_args = shlex.split(a.server_args)
        entries = None if a.url else parse_entries(a.algorithms, a.baseline, server_args)
    except (SpeedBenchDataError, ValueError) as e:
        print(f"speedbench: {e}", file=sys.stderr)
        return 2
    rows = repeat_rows(rows, a.repeat)
    os.makedirs(a.out_dir, exist_ok=True)
    machine = machine_info()
    print(f"speedbench: {len(rows)} rows ({sum(len(r.turns) for r in rows)} turns) from {a.data}, api={a.api}, "
          f"concurrency={a.concurrency}, schedule={a.schedule}, modes="
          f"{[e.label for e in entries] if entries else a.url_label or a.url}", file=sys.stderr)
    _warn_idle_workers(a, rows)
    if not has_flag(server_args, "--max-running-requests"):
        server_args += ["--max-running-requests", str(max(a.concurrency))]
    run = Run(a, rows)
    with sigterm_exits():
        if a.url:
            run.running_servers()
        else:
            run.started_servers(entries, server_args)
    summary = aggregate(run.records, run.walls, a.baseline)
    meta = {"dataset": os.path.abspath(a.data), "split": a.split, "rows": len(rows),
            "turns": sum(len(r.turns) for r in rows), "api": a.api, "max_tokens": a.max_tokens,
            "temperature": a.temperature, "ignore_eos": a.ignore_eos, "concurrency": a.concurrency,
            "schedule": a.schedule, "repeat": a.repeat, "single_turn_only": a.single_turn_only,
            "preclose_thinking": a.preclose_thinking, "baseline": a.baseline, "machine": machine,
            "servers": run.servers, "argv": list(sys.argv if argv is None else argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    paths = write_reports(a.out_dir, summary, run.records, meta, a.baseline,
                          plot=bool(run.records) and not a.no_plot, save_text=a.save_text)
    print(markdown_report(summary, meta, a.baseline))
    print("speedbench: wrote " + ", ".join(paths.values()), file=sys.stderr)
    failed_servers = [s["label"] for s in run.servers if "error" in s]
    n_err = sum(not r.ok for r in run.records)
    if failed_servers:
        print(f"speedbench: server(s) failed to start: {failed_servers}", file=sys.stderr)
    if n_err:
        print(f"speedbench: {n_err} of {len(run.records)} requests failed", file=sys.stderr)
    if not run.records:
        print("speedbench: no measurements", file=sys.stderr)
    return 1 if (failed_servers or n_err or not run.records) else 0
