"""SPEED-Bench harness: serve-and-measure AR, FastDiffuser and LinearSpec in one run.

Loads SPEED-Bench rows (official schema: ``question_id, category, sub_category, turns, source,
src_id, difficulty, multiturn``) from a local parquet/jsonl file or dataset directory, drives one or
more SGLang servers (``/generate``, ``/v1/completions`` or ``/v1/chat/completions``) at temperature 0
over a concurrency sweep, and reports per mode, concurrency and category: output tokens/s, mean
latency, tokens per forward and mean accepted length (plugin ``meta_info``, ``/generate`` only),
and the ratio to AR measured in the same run. Outputs: ``speedbench.json``,
``speedbench_requests.jsonl``, ``speedbench.md``, ``speedbench.png``.

Throughput of a category at concurrency c is measured by running that category's rows alone with c
requests in flight (a worker pool of c; a multi-turn row is one job whose turns go sequentially),
so tok/s = output tokens of the category / wall time of that batch. "overall" sums tokens and wall
times over the categories.

See docs/speedbench.md. Run as ``python launch/speedbench.py ...`` or
``python -m sglang_nemodiff.speedbench ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

CATEGORIES = ("coding", "humanities", "math", "multilingual", "qa", "rag", "reasoning", "roleplay",
              "stem", "summarization", "writing")
SPLITS = ("qualitative", "throughput_1k", "throughput_2k", "throughput_8k", "throughput_16k",
          "throughput_32k")
# field -> (expected type description, may be null)
SCHEMA = {
    "question_id": ("string", False),
    "category": ("string", False),
    "sub_category": ("string", True),
    "turns": ("non-empty list of non-empty strings", False),
    "source": ("string", True),
    "src_id": ("string", True),
    "difficulty": ("string", True),
    "multiturn": ("bool", False),
}
META_TPF = "nemodiff_tokens_per_forward"
META_FORWARDS = "nemodiff_forwards"
META_ACCEPT = "nemodiff_accept_length"
PRECLOSE_TEXT = "<think></think>"
CPU_SERVER_ARGS = "--device cpu --attention-backend torch_native --dtype float32 --max-total-tokens 8192"
STANDIN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "speedbench_standin.jsonl")
OVERALL = "overall"


class SpeedBenchDataError(ValueError):
    """The prompt file is missing or does not follow the SPEED-Bench schema."""


class ServerStartError(RuntimeError):
    """A server started by the harness exited or did not become healthy in time."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    question_id: str
    category: str
    sub_category: str | None
    turns: tuple[str, ...]
    source: str | None
    src_id: str | None
    difficulty: str | None
    multiturn: bool

    @property
    def single_turn(self) -> bool:
        return not self.multiturn and len(self.turns) == 1


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _validate_row(raw: Any, where: str) -> Row:
    if not isinstance(raw, dict):
        raise SpeedBenchDataError(f"{where}: expected an object with fields {list(SCHEMA)}, got {_type_name(raw)}")
    qid = raw.get("question_id")
    where_q = f"{where} (question_id={qid!r})" if isinstance(qid, (str, int)) else where
    missing = [k for k in SCHEMA if k not in raw]
    if missing:
        raise SpeedBenchDataError(
            f"{where_q}: missing field(s) {missing}; the SPEED-Bench schema needs {list(SCHEMA)}")
    vals = {}
    for field, (expected, nullable) in SCHEMA.items():
        v = raw[field]
        if field == "turns":
            if hasattr(v, "tolist"):  # numpy array from pandas-like readers
                v = v.tolist()
            if isinstance(v, tuple):
                v = list(v)
            if not isinstance(v, list) or not v:
                raise SpeedBenchDataError(
                    f"{where_q}: field 'turns' must be a {expected}, got {_type_name(v)} {v!r:.80}")
            for j, t in enumerate(v):
                if not isinstance(t, str) or not t.strip():
                    raise SpeedBenchDataError(
                        f"{where_q}: field 'turns'[{j}] must be a non-empty string, got {_type_name(t)} {t!r:.80}")
            vals[field] = tuple(v)
        elif field == "multiturn":
            if not isinstance(v, bool):
                raise SpeedBenchDataError(f"{where_q}: field 'multiturn' must be a bool, got {_type_name(v)} {v!r:.80}")
            vals[field] = v
        else:
            if v is None and nullable:
                vals[field] = None
                continue
            if field == "question_id" and isinstance(v, int) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str) or (not nullable and not v):
                raise SpeedBenchDataError(
                    f"{where_q}: field {field!r} must be a {'non-empty ' if not nullable else ''}{expected}"
                    f"{' or null' if nullable else ''}, got {_type_name(v)} {v!r:.80}")
            vals[field] = v
    return Row(**vals)


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}: row at line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SpeedBenchDataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _read_json(path: str) -> list[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise SpeedBenchDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise SpeedBenchDataError(f"{path}: expected a JSON list of rows, got {_type_name(data)}")
    return [(f"{path}: row {i}", r) for i, r in enumerate(data)]


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpeedBenchDataError(
            f"{path}: reading parquet needs pyarrow; install it (pip install pyarrow, or the project's "
            "'bench' extra: pip install 'sglang-nemodiff[bench]'), or convert the file to jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SpeedBenchDataError(f"{path}: cannot read as parquet: {e}") from None
    missing = [k for k in SCHEMA if k not in table.column_names]
    if missing:
        raise SpeedBenchDataError(
            f"{path}: parquet columns {table.column_names} lack {missing}; the SPEED-Bench schema needs {list(SCHEMA)}")
    return [(f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist())]


DATA_EXTS = (".parquet", ".jsonl", ".json")


def resolve_dataset_path(path: str, split: str | None = None) -> list[str]:
    """Data files for `path`: the file itself, or the `split` files inside a dataset directory.

    A directory is searched (recursively) for parquet/jsonl/json files whose relative path has the
    split name as a directory or file-name prefix, as in the Hub layout ``qualitative/test-*.parquet``.
    """
    if not os.path.exists(path):
        raise SpeedBenchDataError(
            f"{path}: no such file or directory. Download SPEED-Bench yourself (see docs/speedbench.md) "
            f"or use the bundled stand-in: {STANDIN_PATH}")
    if os.path.isfile(path):
        return [path]
    split = split or "qualitative"
    found: dict[str, list[str]] = {ext: [] for ext in DATA_EXTS}
    for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        ext = next((e for e in DATA_EXTS if f.endswith(e)), None)
        if ext is None or not os.path.isfile(f):
            continue
        parts = os.path.relpath(f, path).split(os.sep)
        if any(q == split or q.startswith(split + "-") for q in parts[:-1] + [parts[-1][:-len(ext)]]):
            found[ext].append(f)
    for ext in DATA_EXTS:  # one format per split: parquet first
        if found[ext]:
            return found[ext]
    raise SpeedBenchDataError(
        f"{path}: directory has no {'/'.join(DATA_EXTS)} files for split {split!r} "
        f"(looked for {split}/*, {split}-*, {split}.jsonl); known splits: {', '.join(SPLITS)}")


def load_rows(path: str, split: str | None = None, *, single_turn_only: bool = False,
              categories: Iterable[str] | None = None, max_per_category: int | None = None) -> list[Row]:
    """Validated SPEED-Bench rows from a local parquet/jsonl/json file or dataset directory."""
    rows: list[Row] = []
    for f in resolve_dataset_path(path, split):
        if f.endswith(".parquet"):
            raw = _read_parquet(f)
        elif f.endswith(".jsonl"):
            raw = _read_jsonl(f)
        else:
            raw = _read_json(f)
        rows.extend(_validate_row(r, where) for where, r in raw)
    if not rows:
        raise SpeedBenchDataError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.question_id] = seen.get(r.question_id, 0) + 1
    dups = [q for q, n in seen.items() if n > 1]
    if dups:
        raise SpeedBenchDataError(f"{path}: duplicate question_id(s) {dups[:5]}")
    if single_turn_only:
        rows = [r for r in rows if r.single_turn]
    if categories:
        wanted = list(categories)
        present = {r.category for r in rows}
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise SpeedBenchDataError(f"{path}: no rows in categories {unknown}; present: {sorted(present)}")
        rows = [r for r in rows if r.category in wanted]
    if max_per_category is not None:
        kept: dict[str, int] = {}
        out = []
        for r in rows:
            if kept.get(r.category, 0) < max_per_category:
                kept[r.category] = kept.get(r.category, 0) + 1
                out.append(r)
        rows = out
    if not rows:
        raise SpeedBenchDataError(f"{path}: no rows left after filtering")
    return rows


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

class PromptBuilder:
    """Turns a conversation into a prompt string (generate/completions) or a message list (chat).

    With `preclose`, ``<think></think>`` is appended after the chat template's generation prompt
    (chat API: as an assistant prefix continued with ``continue_final_message``).
    """

    def __init__(self, tokenizer=None, preclose: bool = False, preclose_text: str = PRECLOSE_TEXT,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.preclose = preclose
        self.preclose_text = preclose_text
        self.system_prompt = system_prompt

    def messages(self, history: Sequence[dict]) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + list(history)

    def text(self, history: Sequence[dict]) -> str:
        msgs = self.messages(history)
        if self.tokenizer is None:  # raw mode: no chat template
            prompt = "\n\n".join(m["content"] for m in msgs)
        else:
            prompt = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt + (self.preclose_text if self.preclose else "")

    def chat_payload(self, history: Sequence[dict]) -> dict:
        msgs = self.messages(history)
        if self.preclose:
            return {"messages": msgs + [{"role": "assistant", "content": self.preclose_text}],
                    "continue_final_message": True, "add_generation_prompt": False}
        return {"messages": msgs}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

def meta_scalar(meta: dict | None, key: str) -> float | None:
    """A plugin meta_info value: a number or a 1-element list of one (None if absent)."""
    if not meta or key not in meta:
        return None
    v = meta[key]
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            return None if not v else float(sum(v)) / len(v)
        v = v[0]
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclasses.dataclass
class RequestRecord:
    mode: str
    concurrency: int
    question_id: str
    category: str
    turn: int
    ok: bool
    latency_s: float
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_per_forward: float | None = None
    forwards: float | None = None
    accept_length: float | None = None
    finish_reason: Any = None
    error: str | None = None
    text: str | None = None


@dataclasses.dataclass
class ApiConfig:
    api: str = "generate"             # generate | completions | chat
    max_tokens: int = 1024
    temperature: float = 0.0
    ignore_eos: bool = False
    request_timeout: float = 600.0
    model_name: str = "default"


async def _post_json(session, url: str, payload: dict, timeout: float) -> dict:
    import aiohttp

    async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:300]}")
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise RuntimeError(f"non-JSON response: {body[:300]}") from None


async def send_turn(session, base_url: str, cfg: ApiConfig, builder: PromptBuilder,
                    history: list[dict]) -> tuple[str, dict]:
    """One request; returns (answer text, stats dict)."""
    if cfg.api == "generate":
        sp = {"temperature": cfg.temperature, "max_new_tokens": cfg.max_tokens}
        if cfg.ignore_eos:
            sp["ignore_eos"] = True
        out = await _post_json(session, base_url + "/generate",
                               {"text": builder.text(history), "sampling_params": sp}, cfg.request_timeout)
        if isinstance(out, list):
            out = out[0]
        meta = out.get("meta_info") or {}
        fin = meta.get("finish_reason")
        return out.get("text", ""), {
            "output_tokens": int(meta.get("completion_tokens", 0)), "prompt_tokens": meta.get("prompt_tokens"),
            "tokens_per_forward": meta_scalar(meta, META_TPF), "forwards": meta_scalar(meta, META_FORWARDS),
            "accept_length": meta_scalar(meta, META_ACCEPT),
            "finish_reason": fin.get("type") if isinstance(fin, dict) else fin}
    payload: dict[str, Any] = {"model": cfg.model_name, "max_tokens": cfg.max_tokens,
                               "temperature": cfg.temperature, "stream": False}
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    if cfg.api == "completions":
        payload["prompt"] = builder.text(history)
        out = await _post_json(session, base_url + "/v1/completions", payload, cfg.request_timeout)
        choice = out["choices"][0]
        text = choice.get("text", "")
    elif cfg.api == "chat":
        payload.update(builder.chat_payload(history))
        out = await _post_json(session, base_url + "/v1/chat/completions", payload, cfg.request_timeout)
        choice = out["choices"][0]
        text = (choice.get("message") or {}).get("content") or ""
    else:
        raise ValueError(f"unknown api {cfg.api!r}")
    usage = out.get("usage") or {}
    meta = out.get("meta_info") or choice.get("meta_info") or {}  # not sent by stock SGLang
    return text, {"output_tokens": int(usage.get("completion_tokens") or 0),
                  "prompt_tokens": usage.get("prompt_tokens"),
                  "tokens_per_forward": meta_scalar(meta, META_TPF), "forwards": meta_scalar(meta, META_FORWARDS),
                  "accept_length": meta_scalar(meta, META_ACCEPT), "finish_reason": choice.get("finish_reason")}


async def run_row(session, base_url: str, cfg: ApiConfig, builder: PromptBuilder, row: Row, mode: str,
                  concurrency: int, keep_text: bool = True, on_request=None) -> list[RequestRecord]:
    """All turns of one row, sequentially; each turn sees the model's earlier answers."""
    history: list[dict] = []
    records = []
    for t, user in enumerate(row.turns):
        history.append({"role": "user", "content": user})
        t0 = time.perf_counter()
        try:
            text, stats = await send_turn(session, base_url, cfg, builder, history)
        except Exception as e:  # record and stop this row: later turns would need this answer
            err = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            records.append(RequestRecord(mode, concurrency, row.question_id, row.category, t, False,
                                         time.perf_counter() - t0, error=err[:500]))
            if on_request:
                on_request(len(row.turns) - t)
            break
        records.append(RequestRecord(mode, concurrency, row.question_id, row.category, t, True,
                                     time.perf_counter() - t0, text=text if keep_text else None, **stats))
        history.append({"role": "assistant", "content": text})
        if on_request:
            on_request(1)
    return records


async def run_batch(base_url: str, cfg: ApiConfig, builder: PromptBuilder, rows: Sequence[Row], mode: str,
                    concurrency: int, on_request=None) -> tuple[list[RequestRecord], float]:
    """`rows` with exactly `concurrency` rows in flight (worker pool); returns (records, wall seconds)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for r in rows:
        queue.put_nowait(r)
    records: list[RequestRecord] = []
    conn = aiohttp.TCPConnector(limit=max(concurrency, 1) + 4)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker():
            while True:
                try:
                    row = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records.extend(await run_row(session, base_url, cfg, builder, row, mode, concurrency,
                                             on_request=on_request))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(rows)))))
        wall = time.perf_counter() - t0
    return records, wall


def group_by_category(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.category, []).append(r)
    return out


def run_sweep(base_url: str, cfg: ApiConfig, builder: PromptBuilder, rows: Sequence[Row], mode: str,
              concurrencies: Sequence[int], progress: bool = True, warmup: int = 2):
    """Every concurrency, every category; returns (records, {(concurrency, category): wall_s})."""
    from tqdm import tqdm

    if warmup:
        wcfg = dataclasses.replace(cfg, max_tokens=min(cfg.max_tokens, 16))
        single = [r for r in rows if r.single_turn] or list(rows)
        warm = [dataclasses.replace(single[i % len(single)], question_id=f"warmup-{i}") for i in range(warmup)]
        recs, _ = asyncio.run(run_batch(base_url, wcfg, builder, warm, mode, min(warmup, max(concurrencies))))
        bad = [r.error for r in recs if not r.ok]
        if bad and len(bad) == len(recs):
            raise RuntimeError(f"{mode}: every warm-up request to {base_url} failed: {bad[0]}")
    records: list[RequestRecord] = []
    walls: dict[tuple[int, str], float] = {}
    by_cat = group_by_category(rows)
    n_turns = sum(len(r.turns) for r in rows)
    for c in concurrencies:
        bar = tqdm(total=n_turns, desc=f"{mode} c={c}", unit="req", disable=not progress, file=sys.stderr)
        try:
            for cat, cat_rows in by_cat.items():
                recs, wall = asyncio.run(run_batch(base_url, cfg, builder, cat_rows, mode, c, on_request=bar.update))
                records.extend(recs)
                walls[(c, cat)] = wall
        finally:
            bar.close()
    return records, walls


# --------------------------------------------------------------------------------------------
# Aggregation and reports
# --------------------------------------------------------------------------------------------

def _weighted(values: list[tuple[float | None, float | None]]) -> float | None:
    """Mean of values, weighted by forwards when every value has them (plain mean otherwise)."""
    vals = [(v, w) for v, w in values if v is not None]
    if not vals:
        return None
    if all(w is not None and w > 0 for _, w in vals):
        return sum(v * w for v, w in vals) / sum(w for _, w in vals)
    return sum(v for v, _ in vals) / len(vals)


def aggregate(records: Sequence[RequestRecord], walls: dict[tuple[str, int, str], float],
              baseline: str = "ar") -> list[dict]:
    """One summary dict per (mode, concurrency, category) plus category 'overall'.

    `walls` maps (mode, concurrency, category) to the wall seconds of that batch.
    """
    groups: dict[tuple[str, int, str], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.mode, r.concurrency, r.category), []).append(r)
    for key in walls:
        groups.setdefault(key, [])
    ar_text = {(r.concurrency, r.question_id, r.turn): r.text for r in records
               if r.mode == baseline and r.ok and r.text is not None}

    def summarize(mode, conc, cat, recs, wall):
        ok = [r for r in recs if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        fw = [r.forwards for r in ok]
        comparable = [r for r in ok if r.text is not None and (conc, r.question_id, r.turn) in ar_text]
        return {
            "mode": mode, "concurrency": conc, "category": cat,
            "rows": len({r.question_id for r in recs}), "requests": len(recs),
            "errors": len(recs) - len(ok), "output_tokens": tokens,
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
            "wall_s": wall, "tok_per_s": tokens / wall if wall > 0 else None,
            "mean_latency_s": sum(r.latency_s for r in ok) / len(ok) if ok else None,
            "mean_request_tok_per_s": (sum(r.output_tokens / r.latency_s for r in ok if r.latency_s > 0) / len(ok)
                                       if ok else None),
            "tokens_per_forward": _weighted([(r.tokens_per_forward, r.forwards) for r in ok]),
            "forwards": sum(fw) if ok and all(f is not None for f in fw) else None,
            "accept_length": _weighted([(r.accept_length, r.forwards) for r in ok]),
            "same_text_as_baseline": (sum(r.text == ar_text[(conc, r.question_id, r.turn)] for r in comparable)
                                      / len(comparable) if comparable else None),
        }

    out = []
    for (mode, conc, cat), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        out.append(summarize(mode, conc, cat, recs, walls.get((mode, conc, cat), 0.0)))
    for mode, conc in sorted({(m, c) for m, c, _ in groups}):
        recs = [r for (m, c, _), rs in groups.items() if (m, c) == (mode, conc) for r in rs]
        wall = sum(w for (m, c, _), w in walls.items() if (m, c) == (mode, conc))
        out.append(summarize(mode, conc, OVERALL, recs, wall))
    base = {(s["concurrency"], s["category"]): s["tok_per_s"] for s in out if s["mode"] == baseline}
    for s in out:
        b = base.get((s["concurrency"], s["category"]))
        s["ratio_vs_baseline"] = s["tok_per_s"] / b if b and s["tok_per_s"] is not None else None
    return out


def _ordered_modes(summary: Sequence[dict], baseline: str) -> list[str]:
    modes = sorted({s["mode"] for s in summary})
    return ([baseline] if baseline in modes else []) + [m for m in modes if m != baseline]


def _fmt(v, spec=".1f", na="n/a"):
    return na if v is None else format(v, spec)


def markdown_report(summary: Sequence[dict], meta: dict | None = None, baseline: str = "ar") -> str:
    modes = _ordered_modes(summary, baseline)
    concs = sorted({s["concurrency"] for s in summary})
    cats = sorted({s["category"] for s in summary if s["category"] != OVERALL})
    idx = {(s["mode"], s["concurrency"], s["category"]): s for s in summary}
    has_base = baseline in modes
    lines = ["# SPEED-Bench results", ""]
    if meta:
        for k in ("dataset", "split", "rows", "api", "max_tokens", "single_turn_only", "preclose_thinking"):
            if k in meta:
                lines.append(f"- {k}: {meta[k]}")
        lines.append("")
    lines += ["Output tok/s = output tokens of a category / wall time of running that category alone at the "
              "given concurrency; overall = all tokens / summed wall times. TPF (tokens per forward) and "
              "accept (mean accepted length) come from the plugin's meta_info (`/generate` only; n/a "
              "otherwise); FastDiffuser's TPF counts every forward, the KV refresh included. "
              f"x{baseline.upper()} = tok/s ratio to {baseline} at the same category and concurrency"
              + ("" if has_base else f" (no {baseline} run: n/a)") + "; same = share of responses "
              f"identical to {baseline}'s.", "", "## Overall", "",
              f"| mode | concurrency | requests | errors | output tokens | tok/s | x{baseline.upper()} | "
              "mean latency s | TPF | accept | same |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in concs:
        for m in modes:
            s = idx.get((m, c, OVERALL))
            if s:
                lines.append(f"| {m} | {c} | {s['requests']} | {s['errors']} | {s['output_tokens']} | "
                             f"{_fmt(s['tok_per_s'])} | {_fmt(s['ratio_vs_baseline'], '.2f')} | "
                             f"{_fmt(s['mean_latency_s'], '.3f')} | {_fmt(s['tokens_per_forward'], '.2f')} | "
                             f"{_fmt(s['accept_length'], '.2f')} | {_fmt(s['same_text_as_baseline'], '.0%')} |")
    for c in concs:
        lines += ["", f"## Per category, concurrency {c}", "",
                  "| category | " + " | ".join(
                      f"{m} tok/s | {m} x{baseline.upper()} | {m} lat s | {m} TPF | {m} accept" for m in modes) + " |",
                  "|---|" + "---|" * (5 * len(modes))]
        for cat in cats + [OVERALL]:
            cells = []
            for m in modes:
                s = idx.get((m, c, cat))
                if s is None:
                    cells += ["-"] * 5
                else:
                    cells += [_fmt(s["tok_per_s"]), _fmt(s["ratio_vs_baseline"], ".2f"),
                              _fmt(s["mean_latency_s"], ".3f"), _fmt(s["tokens_per_forward"], ".2f"),
                              _fmt(s["accept_length"], ".2f")]
            name = f"**{cat}**" if cat == OVERALL else cat
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for srv in (meta or {}).get("servers", []):
        if srv.get("error"):
            first = srv["error"].splitlines()[0] if srv["error"] else ""
            lines += ["", f"**server {srv.get('label')} did not start**: {first}"]
    errs = sum(s["errors"] for s in summary if s["category"] == OVERALL)
    if errs:
        lines += ["", f"**{errs} request(s) failed**: see `error` in speedbench_requests.jsonl."]
    return "\n".join(lines) + "\n"


def plot_report(summary: Sequence[dict], path: str, baseline: str = "ar", title: str | None = None) -> str:
    """Tokens/s vs concurrency per mode (overall), plus the ratio to the baseline when present."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install matplotlib (or the 'bench' extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = _ordered_modes(summary, baseline)
    overall = [s for s in summary if s["category"] == OVERALL]
    has_base = baseline in modes and len(modes) > 1
    fig, axes = plt.subplots(1, 2 if has_base else 1, figsize=(11 if has_base else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for m in modes:
        pts = sorted((s["concurrency"], s["tok_per_s"]) for s in overall if s["mode"] == m and s["tok_per_s"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    concs = sorted({s["concurrency"] for s in overall})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("SPEED-Bench throughput (all categories)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if has_base:
        ax2 = axes[0][1]
        for m in modes:
            pts = sorted((s["concurrency"], s["ratio_vs_baseline"]) for s in overall
                         if s["mode"] == m and s["ratio_vs_baseline"] is not None)
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(concs, [str(c) for c in concs])
        ax2.set_xlabel("concurrency")
        ax2.set_ylabel(f"tok/s ratio to {baseline}")
        ax2.set_title(f"speed-up vs {baseline}")
        ax2.grid(True, alpha=0.3)
        ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(out_dir: str, summary: Sequence[dict], records: Sequence[RequestRecord], meta: dict,
                  baseline: str = "ar", plot: bool = True, save_text: bool = False) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "speedbench.json"),
             "requests": os.path.join(out_dir, "speedbench_requests.jsonl"),
             "markdown": os.path.join(out_dir, "speedbench.md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "summary": list(summary)}, f, indent=2)
    with open(paths["requests"], "w") as f:
        for r in records:
            d = dataclasses.asdict(r)
            if not save_text:
                d.pop("text")
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(summary, meta, baseline))
    if plot:
        paths["plot"] = plot_report(summary, os.path.join(out_dir, "speedbench.png"), baseline,
                                    title=meta.get("title"))
    return paths


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_server_args() -> str:
    """CPU arguments when no CUDA GPU is visible, none otherwise."""
    try:
        import torch

        if torch.cuda.is_available():
            return ""
    except Exception:
        pass
    return CPU_SERVER_ARGS


class ManagedServer:
    """`python -m sglang.launch_server --algorithm A ...` in its own process group."""

    def __init__(self, model_path: str, algorithm: str, server_args: Sequence[str] = (), host: str = "127.0.0.1",
                 port: int | None = None, log_path: str | None = None, env: dict | None = None,
                 launcher: Sequence[str] | None = None):
        self.model_path, self.algorithm = model_path, algorithm
        self.host, self.port = host, port or free_port()
        launcher = list(launcher) if launcher else [sys.executable, "-m", "sglang.launch_server"]
        self.cmd = [*launcher, "--model-path", model_path,
                    "--algorithm", algorithm, "--host", host, "--port", str(self.port), *server_args]
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        return self

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> float:
        """Wait until /health_generate answers 200; returns the seconds waited."""
        import requests

        t0 = time.monotonic()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_tail()
                hint = ("\nhint: this SGLang has no --algorithm flag: is the sglang_nemodiff plugin installed "
                        "(pip install -e .) in this environment?" if "--algorithm" in tail and "unrecognized" in tail else "")
                raise ServerStartError(f"server for {self.algorithm!r} exited with code {self.proc.returncode} "
                                       f"before becoming healthy; command: {shlex.join(self.cmd)}\n"
                                       f"log tail ({self.log_path}):\n{tail}{hint}")
            try:
                if requests.get(self.url + "/health_generate", timeout=max(poll, 5.0)).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > timeout:
                raise ServerStartError(f"server for {self.algorithm!r} not healthy after {timeout:.0f} s; "
                                       f"command: {shlex.join(self.cmd)}\nlog tail ({self.log_path}):\n{self.log_tail()}")
            time.sleep(poll)

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # children left in the group after the launcher exited
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def server_info(base_url: str) -> dict:
    """Best-effort /model_info, /server_info and /v1/models facts about a running server."""
    import requests

    info: dict[str, Any] = {}
    try:
        mi = requests.get(base_url + "/model_info", timeout=10).json()
        info.update({k: mi.get(k) for k in ("model_path", "tokenizer_path", "served_model_name")})
    except Exception:
        pass
    try:
        si = requests.get(base_url + "/server_info", timeout=10).json()
        for k in ("algorithm", "nemodiff_algorithm", "dllm_algorithm", "version", "launch_command"):
            if si.get(k) is not None:
                info[k] = si[k]
    except Exception:
        pass
    try:
        models = requests.get(base_url + "/v1/models", timeout=10).json().get("data") or []
        if models:
            info["model_id"] = models[0].get("id")
    except Exception:
        pass
    return info


def label_from_info(info: dict, fallback: str) -> str:
    for k in ("algorithm", "nemodiff_algorithm"):
        if isinstance(info.get(k), str) and info[k]:
            return info[k]
    cmd = info.get("launch_command")
    if isinstance(cmd, str):
        toks = shlex.split(cmd)
        for i, t in enumerate(toks):
            if t == "--algorithm" and i + 1 < len(toks):
                return toks[i + 1]
            if t.startswith("--algorithm="):
                return t.split("=", 1)[1]
    return fallback


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

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
                   help="mode name of the --url server at the same position (default: read from the server)")
    s.add_argument("--model-path", default=None, help="start servers for this checkpoint, one per --algorithms")
    s.add_argument("--algorithms", default="ar,fastdiffuser,linearspec")
    s.add_argument("--server-args", default=None,
                   help="extra launch_server arguments (default: '" + CPU_SERVER_ARGS + "' when no CUDA GPU is "
                        "visible, nothing otherwise); --max-running-requests defaults to the largest concurrency")
    s.add_argument("--server-start-timeout", type=float, default=900.0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--launcher", default=None,
                   help="command that starts a server (default: this Python's -m sglang.launch_server)")
    r = p.add_argument_group("load")
    r.add_argument("--api", choices=("generate", "completions", "chat"), default="generate")
    r.add_argument("--concurrency", type=parse_int_list, default=[1, 2, 4, 8, 16, 32])
    r.add_argument("--max-tokens", type=int, default=1024)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    r.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    r.add_argument("--warmup", type=int, default=2, help="unrecorded warm-up requests per server")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="speedbench_out")
    o.add_argument("--baseline", default="ar", help="mode the ratios are relative to")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--save-text", action="store_true", help="keep generated texts in speedbench_requests.jsonl")
    o.add_argument("--no-progress", action="store_true")
    return p


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if bool(a.url) == bool(a.model_path):
        p.error("give either --model-path (the harness starts the servers) or --url (running servers), not both")
    if a.url_label and len(a.url_label) != len(a.url):
        p.error(f"{len(a.url_label)} --url-label for {len(a.url)} --url")
    if a.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    try:
        rows = load_rows(a.data, a.split, single_turn_only=a.single_turn_only,
                         categories=[c for c in a.categories.split(",") if c] if a.categories else None,
                         max_per_category=a.max_per_category)
    except SpeedBenchDataError as e:
        print(f"speedbench: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out_dir, exist_ok=True)
    concs = a.concurrency
    cfg = ApiConfig(api=a.api, max_tokens=a.max_tokens, temperature=a.temperature, ignore_eos=a.ignore_eos,
                    request_timeout=a.request_timeout)
    print(f"speedbench: {len(rows)} rows ({sum(len(r.turns) for r in rows)} turns) from {a.data}, "
          f"{len(group_by_category(rows))} categories, api={a.api}, concurrency={concs}", file=sys.stderr)

    tokenizer_cache: dict[str, Any] = {}

    def make_builder(tok_path: str | None) -> PromptBuilder:
        tok = None
        if a.api != "chat" and not a.no_chat_template:
            tok_path = a.tokenizer or tok_path
            if not tok_path:
                raise SystemExit("speedbench: no tokenizer for the chat template: pass --tokenizer PATH "
                                 "(or --no-chat-template, or --api chat)")
            if tok_path not in tokenizer_cache:
                try:
                    tokenizer_cache[tok_path] = load_tokenizer(tok_path)
                except Exception as e:
                    raise SystemExit(f"speedbench: cannot load the tokenizer (chat template) from {tok_path!r}: "
                                     f"{type(e).__name__}: {e}\npass --tokenizer PATH, --no-chat-template or --api chat")
            tok = tokenizer_cache[tok_path]
        return PromptBuilder(tok, a.preclose_thinking, a.preclose_text, a.system_prompt)

    records: list[RequestRecord] = []
    walls: dict[tuple[str, int, str], float] = {}
    servers_meta: list[dict] = []

    def measure(label: str, url: str, info: dict, builder: PromptBuilder) -> None:
        cfg.model_name = info.get("model_id") or info.get("served_model_name") or "default"
        t0 = time.time()
        recs, w = run_sweep(url, cfg, builder, rows, label, concs, progress=not a.no_progress, warmup=a.warmup)
        records.extend(recs)
        walls.update({(label, c, cat): v for (c, cat), v in w.items()})
        servers_meta[-1]["sweep_s"] = round(time.time() - t0, 2)

    if a.url:
        for i, url in enumerate(a.url):
            url = url.rstrip("/")
            info = server_info(url)
            label = a.url_label[i] if a.url_label else label_from_info(info, f"server{i}")
            servers_meta.append({"label": label, "url": url, "started_by_harness": False, **info})
            measure(label, url, info, make_builder(info.get("tokenizer_path") or info.get("model_path")))
    else:
        algos = [x.strip() for x in a.algorithms.split(",") if x.strip()]
        # AR first: the baseline is measured before the modes compared to it.
        algos = sorted(algos, key=lambda x: x != a.baseline)
        extra = shlex.split(default_server_args() if a.server_args is None else a.server_args)
        if not _has_flag(extra, "--max-running-requests"):
            extra += ["--max-running-requests", str(max(concs))]
        builder = make_builder(a.model_path)
        for algo in algos:
            srv = ManagedServer(a.model_path, algo, extra, host=a.host,
                                log_path=os.path.join(a.out_dir, f"server_{algo}.log"),
                                launcher=shlex.split(a.launcher) if a.launcher else None)
            print(f"speedbench: starting {algo}: {shlex.join(srv.cmd)}", file=sys.stderr)
            try:
                srv.start()
                ready = srv.wait_ready(a.server_start_timeout)
                print(f"speedbench: {algo} ready after {ready:.1f} s", file=sys.stderr)
                info = server_info(srv.url)
                servers_meta.append({"label": algo, "url": srv.url, "started_by_harness": True,
                                     "command": shlex.join(srv.cmd), "start_s": round(ready, 2), **info})
                measure(algo, srv.url, info, builder)
            except ServerStartError as e:
                print(f"speedbench: {e}", file=sys.stderr)
                servers_meta.append({"label": algo, "started_by_harness": True, "error": str(e)[:2000]})
            finally:
                srv.stop()

    summary = aggregate(records, walls, a.baseline)
    meta = {"dataset": os.path.abspath(a.data), "split": a.split, "rows": len(rows),
            "turns": sum(len(r.turns) for r in rows), "api": a.api, "max_tokens": a.max_tokens,
            "temperature": a.temperature, "ignore_eos": a.ignore_eos, "concurrency": concs,
            "single_turn_only": a.single_turn_only, "preclose_thinking": a.preclose_thinking,
            "baseline": a.baseline, "servers": servers_meta, "argv": list(sys.argv if argv is None else argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    paths = write_reports(a.out_dir, summary, records, meta, a.baseline, plot=bool(records) and not a.no_plot,
                          save_text=a.save_text)
    print(markdown_report(summary, meta, a.baseline))
    print("speedbench: wrote " + ", ".join(paths.values()), file=sys.stderr)
    failed_servers = [s["label"] for s in servers_meta if "error" in s]
    n_err = sum(not r.ok for r in records)
    if failed_servers:
        print(f"speedbench: server(s) failed to start: {failed_servers}", file=sys.stderr)
    if n_err:
        print(f"speedbench: {n_err} of {len(records)} requests failed", file=sys.stderr)
    if not records:
        print("speedbench: no measurements", file=sys.stderr)
    return 1 if (failed_servers or n_err or not records) else 0


if __name__ == "__main__":
    sys.exit(main())
