"""The load generator: prompts (chat template, pre-closed thinking), one request per turn through
`/generate`, `/v1/completions` or `/v1/chat/completions`, a worker pool of c rows in flight, and the
concurrency sweep of one server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
from typing import Any, Sequence

from sglang_nemodiff.speedbench.data import OVERALL, Row, group_by_category

META_TPF = "nemodiff_tokens_per_forward"
META_FORWARDS = "nemodiff_forwards"
META_ACCEPT = "nemodiff_accept_length"
PRECLOSE_TEXT = "<think></think>"
SCHEDULES = ("category", "mixed")


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


def _stats(meta: dict, output_tokens, prompt_tokens, finish_reason) -> dict:
    return {"output_tokens": int(output_tokens or 0), "prompt_tokens": prompt_tokens,
            "tokens_per_forward": meta_scalar(meta, META_TPF), "forwards": meta_scalar(meta, META_FORWARDS),
            "accept_length": meta_scalar(meta, META_ACCEPT),
            "finish_reason": finish_reason.get("type") if isinstance(finish_reason, dict) else finish_reason}


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
        return out.get("text", ""), _stats(meta, meta.get("completion_tokens"), meta.get("prompt_tokens"),
                                           meta.get("finish_reason"))
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
    return text, _stats(meta, usage.get("completion_tokens"), usage.get("prompt_tokens"),
                        choice.get("finish_reason"))


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


def batches(rows: Sequence[Row], schedule: str) -> dict[str, list[Row]]:
    """The row batches of one concurrency: each category alone, or all rows together (`mixed`)."""
    if schedule == "mixed":
        return {OVERALL: list(rows)}
    if schedule == "category":
        return group_by_category(rows)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def warm_up(base_url: str, cfg: ApiConfig, builder: PromptBuilder, rows: Sequence[Row], mode: str,
            n: int, concurrency: int) -> None:
    """`n` unrecorded short requests; raises if every one of them failed."""
    wcfg = dataclasses.replace(cfg, max_tokens=min(cfg.max_tokens, 16))
    single = [r for r in rows if r.single_turn] or list(rows)
    warm = [dataclasses.replace(single[i % len(single)], question_id=f"warmup-{i}") for i in range(n)]
    recs, _ = asyncio.run(run_batch(base_url, wcfg, builder, warm, mode, min(n, concurrency)))
    bad = [r.error for r in recs if not r.ok]
    if bad and len(bad) == len(recs):
        raise RuntimeError(f"{mode}: every warm-up request to {base_url} failed: {bad[0]}")


def run_sweep(base_url: str, cfg: ApiConfig, builder: PromptBuilder, rows: Sequence[Row], mode: str,
              concurrencies: Sequence[int], progress: bool = True, warmup: int = 2,
              schedule: str = "category"):
    """Every concurrency, every batch of `batches(rows, schedule)`; returns
    (records, {(concurrency, batch name): wall_s}) where a batch name is a category or `overall`."""
    from tqdm import tqdm

    if warmup:
        warm_up(base_url, cfg, builder, rows, mode, warmup, max(concurrencies))
    records: list[RequestRecord] = []
    walls: dict[tuple[int, str], float] = {}
    n_turns = sum(len(r.turns) for r in rows)
    for c in concurrencies:
        bar = tqdm(total=n_turns, desc=f"{mode} c={c}", unit="req", disable=not progress, file=sys.stderr)
        try:
            for name, batch in batches(rows, schedule).items():
                recs, wall = asyncio.run(run_batch(base_url, cfg, builder, batch, mode, c, on_request=bar.update))
                records.extend(recs)
                walls[(c, name)] = wall
        finally:
            bar.close()
    return records, walls


def server_facts(base_url: str) -> dict:
    """What a running server says about its model (`/model_info`, `/v1/models`); best effort."""
    import requests

    facts: dict[str, Any] = {}
    try:
        info = requests.get(base_url + "/model_info", timeout=10).json()
        facts.update({k: info[k] for k in ("model_path", "tokenizer_path") if info.get(k)})
    except Exception:
        pass
    try:
        models = requests.get(base_url + "/v1/models", timeout=10).json().get("data") or []
        if models and models[0].get("id"):
            facts["model_id"] = models[0]["id"]
    except Exception:
        pass
    return facts
