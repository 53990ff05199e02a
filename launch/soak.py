#!/usr/bin/env python
"""Bounded soak test: a few minutes of mixed concurrent load per generation mode, then the checks
that must all be zero (server deaths, leaked KV slots, unexpected errors, temperature-0 outputs that
differ from the plain-PyTorch oracle).

For each mode (`--modes ar,linearspec,fastdiffuser,quadratic`) it starts one loopback server
(`sglang_nemodiff.servers.ManagedServer`, bundled model unless `--model-path`) with SGLang's strict
idle KV check on (a leaked KV slot kills the server at idle) and runs `--duration` seconds of load
from `--concurrency` clients:

- prompts of 1..`--max-prompt` tokens cut from the stand-in prompt corpus, a share of them starting
  with one of a few long shared prefixes (radix cache hits); mixed `max_new_tokens`;
- `/generate`, `/v1/completions` and `/v1/chat/completions`, streamed and not;
- `--disconnect-fraction` of the requests streamed and dropped by the client after the first chunk;
- `--bad-fraction` of the requests invalid (ids outside the vocabulary, empty prompts, malformed
  JSON, prompts longer than the context, bad sampling values): each must be answered with a 4xx;
- `--sampled-fraction` of the requests at temperature > 0 (every mode serves them; they must
  complete, and are never compared with the oracle).

After the load it waits for the server to go idle (all DP ranks: no running or waiting request),
lets the idle KV check run, and reads the pool's used slots from `/v1/loads` (`num_used_tokens`
counts neither free nor radix-cached evictable slots: at idle it must be back at its starting
value). Then every completed temperature-0 output whose prompt ids and output ids are known is
compared with the oracle (`ar_generate` for ar, linearspec and quadratic, `fastdiffuser_generate` for
fastdiffuser; `--verify-limit` compares a fixed-seed sample instead). Chat streams are not
compared (SGLang returns no token ids for them).

Writes `soak.json` and `soak.md` (and the server logs) to `--out`, prints the markdown table, and
exits 1 if any must-be-zero figure is not zero. Loopback only; stops by itself.

    python launch/soak.py --duration 180 --out /tmp/soak --note "nothing else running"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time
from typing import Any, Callable, Sequence

try:
    import sglang_nemodiff  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_nemodiff.servers import ManagedServer, cuda_visible, sigterm_exits

MODES = ("ar", "linearspec", "fastdiffuser", "quadratic")
DIFFUSION_MODES = ("linearspec", "fastdiffuser", "quadratic")
APIS = ("generate", "completions", "chat")
NEW_TOKENS = (1, 7, 16, 31, 32, 33, 64, 100, 200)
# The figures that must be zero for a mode to pass.
MUST_BE_ZERO = ("errors", "server_deaths", "leaked_kv_tokens", "mismatches")


@dataclasses.dataclass
class SoakConfig:
    duration: float = 180.0           # seconds of load per mode (no new request after it)
    concurrency: int = 8              # clients, each sending one request after another
    seed: int = 0
    max_prompt: int = 600             # prompt tokens, 1..max_prompt
    new_tokens: Sequence[int] = NEW_TOKENS
    stream_fraction: float = 0.4      # of the well-formed requests that run to the end
    disconnect_fraction: float = 0.1  # streamed, dropped by the client after the first chunk
    bad_fraction: float = 0.1         # invalid requests: each must get a 4xx
    sampled_fraction: float = 0.0     # temperature 0.8 (not compared with the oracle)
    shared_prefix_fraction: float = 0.4
    request_timeout: float = 300.0
    idle_timeout: float = 300.0       # after the load: time allowed to drain and go idle
    idle_settle: float = 3.0          # idle seconds before reading the pool (the idle check runs)
    verify_limit: int | None = None   # T=0 outputs compared with the oracle (None: all)
    min_requests: int = 0             # keep sending past `duration` until this many were sent


# ------------------------------------------------------------------------------------------------
# The request mix
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """One request: what to send and what counts as its expected answer."""
    index: int
    api: str
    stream: bool = False
    disconnect: bool = False          # drop the connection after the first streamed chunk
    bad: str | None = None            # name of the invalid-request case (expects a 4xx)
    sampled: bool = False
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_new_tokens: int = 16
    raw_body: bytes | None = None     # sent as is (malformed JSON)
    payload: dict | None = None       # prebuilt payload (invalid cases)


class Corpus:
    """Prompt material: the stand-in prompts tokenized into one stream, cut into windows; a few
    long shared prefixes; the model's vocabulary size and context length for the invalid cases."""

    def __init__(self, tokenizer, vocab_size: int, context_len: int, max_prompt: int, seed: int,
                 max_new_tokens: int = max(NEW_TOKENS)):
        from sglang_nemodiff.speedbench.data import STANDIN_PATH, load_rows

        texts = [turn for row in load_rows(STANDIN_PATH) for turn in row.turns]
        self.texts = texts
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        self.ids = [t for t in ids if 0 <= t < vocab_size] or list(range(min(vocab_size, 256)))
        self.vocab_size, self.context_len = vocab_size, context_len
        self.max_prompt = max(1, min(max_prompt, context_len - max_new_tokens - 8))
        self.empty_text_is_empty = len(tokenizer("").input_ids) == 0
        rng = random.Random(seed)
        lengths = [n for n in (64, 160, 320, 480) if n < self.max_prompt] or [max(1, self.max_prompt // 2)]
        self.prefixes = [self.window(rng, n) for n in lengths]

    def window(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.ids))
        return [self.ids[(start + i) % len(self.ids)] for i in range(n)]

    def prompt(self, rng: random.Random, shared_fraction: float) -> list[int]:
        if rng.random() < shared_fraction:
            prefix = rng.choice(self.prefixes)
            tail = rng.randint(1, max(1, min(120, self.max_prompt - len(prefix))))
            return (prefix + self.window(rng, tail))[: self.max_prompt]
        # Log-uniform lengths: many short prompts, some long ones.
        n = int(round(self.max_prompt ** rng.random()))
        ids = self.window(rng, max(1, n))
        if rng.random() < 0.2:  # any in-vocabulary id is valid, the mask id included
            ids = [rng.randrange(self.vocab_size) if rng.random() < 0.3 else t for t in ids]
        return ids


def bad_cases(corpus: Corpus) -> list[tuple[str, str, dict | bytes]]:
    """(name, api, payload or raw body) of each invalid request; every one must get a 4xx."""
    v, ok = corpus.vocab_size, [5, 6, 7]
    sp = {"max_new_tokens": 8, "temperature": 0}
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ("id_outside_vocab", "generate", {"input_ids": ok + [v], "sampling_params": sp}),
        ("negative_id", "generate", {"input_ids": [-1] + ok, "sampling_params": sp}),
        ("id_outside_vocab_openai", "completions", {"prompt": ok + [v + 1000], "max_tokens": 8}),
        ("non_integer_id", "generate", {"input_ids": ok + ["x"], "sampling_params": sp}),
        ("empty_ids", "generate", {"input_ids": [], "sampling_params": sp}),
        ("empty_prompt_openai", "completions", {"prompt": "", "max_tokens": 8}),
        ("empty_messages", "chat", {"messages": [], "max_tokens": 8}),
        ("malformed_json", "generate", b'{"text": "def f(x):", "sampling_params": {'),
        ("malformed_json_openai", "chat", b'{"model": "m", "messages": [{"role": "user"'),
        ("prompt_over_context", "generate", {"input_ids": [ok[0]] * (corpus.context_len + 1),
                                             "sampling_params": sp}),
        ("negative_temperature", "generate", {"input_ids": ok, "sampling_params": {**sp, "temperature": -1}}),
        ("top_p_zero", "generate", {"input_ids": ok, "sampling_params": {**sp, "top_p": 0}}),
        ("negative_max_new_tokens", "generate", {"input_ids": ok, "sampling_params": {"max_new_tokens": -1}}),
        # (at temperature 0 SGLang ignores top_k: no temperature here)
        ("bad_top_k", "generate", {"input_ids": ok, "sampling_params": {"max_new_tokens": 8, "top_k": -5}}),
        ("top_p_over_one_openai", "completions", {"prompt": ok, "max_tokens": 8, "top_p": 1.5}),
        ("negative_max_tokens_openai", "chat", {"messages": msgs, "max_tokens": -3}),
    ]
    if corpus.empty_text_is_empty:  # a tokenizer that adds a BOS makes "" a valid prompt
        cases.append(("empty_text", "generate", {"text": "", "sampling_params": sp}))
    return cases


def make_plan(index: int, cfg: SoakConfig, corpus: Corpus, cases) -> Plan:
    """Request `index` of the mix; deterministic in (seed, index) whatever the timing."""
    rng = random.Random(f"{cfg.seed}:{index}")
    every = max(1, round(1 / cfg.bad_fraction)) if cfg.bad_fraction > 0 else 0
    if every and index % every == every - 1:  # the invalid cases in turn, interleaved
        name, api, body = cases[(index // every) % len(cases)]
        if isinstance(body, bytes):
            return Plan(index, api, bad=name, raw_body=body)
        return Plan(index, api, bad=name, payload=body, stream=rng.random() < 0.3)
    api = rng.choice(APIS)
    plan = Plan(index, api, max_new_tokens=rng.choice(list(cfg.new_tokens)),
                sampled=rng.random() < cfg.sampled_fraction)
    if rng.random() < cfg.disconnect_fraction:
        plan.stream = plan.disconnect = True
        plan.max_new_tokens = max(plan.max_new_tokens, 64)  # long enough to be cut
    else:
        plan.stream = rng.random() < cfg.stream_fraction
    if api == "chat":
        first = rng.randrange(len(corpus.texts))
        text = "\n".join(corpus.texts[(first + i) % len(corpus.texts)] for i in range(rng.randint(1, 4)))
        plan.messages = [{"role": "user", "content": text}]
    else:
        plan.prompt_ids = corpus.prompt(rng, cfg.shared_prefix_fraction)
    return plan


# ------------------------------------------------------------------------------------------------
# One request
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    index: int
    api: str
    stream: bool
    status: str                       # completed | rejected | aborted | error
    latency_s: float
    bad: str | None = None
    sampled: bool = False
    http_status: int | None = None
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    output_tokens: int = 0
    max_new_tokens: int = 0
    finish_reason: str | None = None
    cached_tokens: int = 0
    detail: str | None = None


def request_body(plan: Plan, model: str) -> tuple[str, dict | bytes]:
    """(path, JSON payload or raw body) for `plan`."""
    path = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}[plan.api]
    if plan.raw_body is not None:
        return path, plan.raw_body
    if plan.payload is not None:
        body = dict(plan.payload)
        if plan.api != "generate":
            body["model"] = model
        if plan.stream:
            body["stream"] = True
        return path, body
    temperature = 0.8 if plan.sampled else 0.0
    if plan.api == "generate":
        body = {"input_ids": plan.prompt_ids,
                "sampling_params": {"temperature": temperature, "max_new_tokens": plan.max_new_tokens}}
        if plan.sampled:
            body["sampling_params"]["top_p"] = 0.95
    else:
        body = {"model": model, "max_tokens": plan.max_new_tokens, "temperature": temperature}
        if plan.sampled:
            body["top_p"] = 0.95
        if plan.api == "completions":
            body.update(prompt=plan.prompt_ids, return_token_ids=True)
        else:
            body["messages"] = plan.messages
            if not plan.stream:  # token ids are not offered for chat streams
                body.update(return_token_ids=True, return_prompt_token_ids=True)
    if plan.stream:
        body["stream"] = True
        if plan.api != "generate":
            body["stream_options"] = {"include_usage": True}
    return path, body


def _error_status(chunk: dict) -> tuple[int | None, str | None]:
    """(status, message) of an error or abort carried inside a 200 stream, else (None, None)."""
    if "error" in chunk:
        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
        return int(err.get("code") or err.get("status_code") or 500), str(err.get("message"))
    if chunk.get("object") == "error":
        return int(chunk.get("code") or 500), str(chunk.get("message"))
    finish = (chunk.get("meta_info") or {}).get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return int(finish.get("status_code") or 500), str(finish.get("message"))
    return None, None


class Accumulator:
    """The output of one response, streamed (chunk by chunk) or not."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.prompt_ids = plan.prompt_ids
        self.output_ids: list[int] | None = None if plan.api == "chat" and plan.stream else []
        self.tokens = 0
        self.finish: str | None = None
        self.cached = 0
        self.error: tuple[int, str] | None = None

    def add(self, chunk: dict) -> None:
        status, message = _error_status(chunk)
        if status is not None:
            self.error = (status, message)
            return
        if self.plan.api == "generate":
            meta = chunk.get("meta_info") or {}
            self.output_ids = list(chunk.get("output_ids") or [])  # cumulative
            self.tokens = int(meta.get("completion_tokens") or len(self.output_ids))
            self.cached = int(meta.get("cached_tokens") or 0)
            finish = meta.get("finish_reason")
            self.finish = finish.get("type") if isinstance(finish, dict) else finish
            return
        for choice in chunk.get("choices") or []:
            if self.plan.api == "completions":
                self.prompt_ids = choice.get("prompt_token_ids") or self.prompt_ids
                self.output_ids += choice.get("token_ids") or []  # incremental when streamed
            elif not self.plan.stream:
                self.prompt_ids = choice.get("prompt_token_ids")
                self.output_ids = choice.get("response_token_ids")
            self.finish = choice.get("finish_reason") or self.finish
        usage = chunk.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            self.tokens = int(usage["completion_tokens"])
        elif self.output_ids:
            self.tokens = len(self.output_ids)
        elif self.plan.stream and chunk.get("choices"):
            self.tokens += 1  # chat stream without usage: one chunk per detokenized step


async def send(session, base_url: str, plan: Plan, model: str, timeout: float) -> Outcome:
    """Send `plan` and classify the answer."""
    import aiohttp

    path, body = request_body(plan, model)
    acc = Accumulator(plan)
    out = Outcome(plan.index, plan.api, plan.stream, "error", 0.0, bad=plan.bad, sampled=plan.sampled,
                  prompt_ids=plan.prompt_ids, max_new_tokens=plan.max_new_tokens)
    kwargs = ({"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
              else {"json": body})
    t0 = time.perf_counter()
    dropped = False
    try:
        async with session.post(base_url + path, timeout=aiohttp.ClientTimeout(total=timeout), **kwargs) as resp:
            out.http_status = resp.status
            if resp.status != 200:
                out.detail = (await resp.text())[:300]
            elif plan.stream:
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    acc.add(json.loads(data))
                    if acc.error or acc.finish:
                        continue
                    if plan.disconnect:
                        dropped = True
                        resp.close()  # the client goes away mid-stream
                        break
            else:
                acc.add(json.loads(await resp.read()))
    except asyncio.TimeoutError:
        out.detail = f"no answer within {timeout:.0f} s"
    except (aiohttp.ClientError, json.JSONDecodeError, OSError) as e:
        out.detail = f"{type(e).__name__}: {e}"[:300]
    out.latency_s = time.perf_counter() - t0
    out.prompt_ids, out.output_ids, out.output_tokens = acc.prompt_ids, acc.output_ids, acc.tokens
    out.finish_reason, out.cached_tokens = acc.finish, acc.cached
    status = acc.error[0] if acc.error else out.http_status
    if acc.error:
        out.detail = acc.error[1][:300]
    out.status = classify(plan, status, dropped, acc.finish, out.detail)
    return out


def classify(plan: Plan, status: int | None, dropped: bool, finish: str | None, detail: str | None) -> str:
    """completed | rejected (an expected 4xx) | aborted (the client dropped it) | error."""
    if plan.bad is not None:
        return "rejected" if status is not None and 400 <= status < 500 else "error"
    if status != 200:
        return "error"
    if dropped:
        return "aborted"
    return "completed" if finish in ("length", "stop") else "error"


# ------------------------------------------------------------------------------------------------
# One mode against one server
# ------------------------------------------------------------------------------------------------

def _get_json(url: str, timeout: float = 30.0) -> Any:
    import requests

    response = requests.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def pool_state(base_url: str) -> list[dict]:
    """Per DP rank: used KV slots (neither free nor radix-cached), running and waiting requests."""
    loads = _get_json(base_url + "/v1/loads?include=core")["loads"]
    return [{k: load.get(k) for k in ("dp_rank", "num_used_tokens", "num_running_reqs", "num_waiting_reqs",
                                      "max_total_num_tokens")} for load in loads]


def _used(state: list[dict]) -> int:
    return sum(s["num_used_tokens"] for s in state)


def wait_idle(base_url: str, timeout: float, settle: float, alive: Callable[[], bool],
              target_used: int | None = None) -> tuple[list[dict] | None, bool]:
    """(pool state, reached): the state once it has held still for `settle` s with no running or
    waiting request on any rank and (if given) `target_used` used KV slots; else, at `timeout` or
    when the server dies, the last state read and False.

    The used slots are part of the test because /v1/loads does not count requests inside a dLLM
    round (SGLang's staging queue) as running: a request still being served, or an aborted one
    not yet released, shows only as used slots that still change."""
    deadline = time.monotonic() + timeout
    still_since, previous, state = None, None, None
    while time.monotonic() < deadline and alive():
        try:
            state = pool_state(base_url)
        except Exception:
            state = None
        quiet = state is not None and all(not s["num_running_reqs"] and not s["num_waiting_reqs"] for s in state)
        if quiet and (target_used is None or _used(state) == target_used) and _used(state) == previous:
            still_since = still_since or time.monotonic()
            if time.monotonic() - still_since >= settle:
                return state, True
        else:
            still_since = None
        previous = _used(state) if state else None
        time.sleep(0.5)
    return state, False


class ServerWatch:
    """Whether the server under load is still the one that started: its launcher process alive (when
    we started it) and /server_info's start time unchanged."""

    def __init__(self, base_url: str, proc=None):
        self.base_url, self.proc = base_url, proc
        self.startup_time = self._startup_time()
        self.deaths = 0

    def _startup_time(self):
        try:
            return _get_json(self.base_url + "/server_info").get("startup_time")
        except Exception:
            return None

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return True

    def check(self) -> bool:
        """False (and one more death counted) if the server died or was restarted since."""
        ok = self.alive()
        if ok and self.proc is None:  # an external server: ask it
            started = self._startup_time()
            ok = started is not None and started == self.startup_time
        if not ok:
            self.deaths += 1
        return ok


async def _load(base_url: str, cfg: SoakConfig, model: str, plan_at: Callable[[int], Plan],
                alive: Callable[[], bool]) -> tuple[list[Outcome], float]:
    import aiohttp

    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    deadline = time.monotonic() + cfg.duration
    conn = aiohttp.TCPConnector(limit=cfg.concurrency + 4, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        sent = 0

        async def client():
            nonlocal sent
            # A slow machine still gets the whole mix: the bad cases come in turn, so a short soak
            # with too few requests would not reach all of them.
            while (time.monotonic() < deadline or sent < cfg.min_requests) and alive():
                sent += 1
                outcomes.append(await send(session, base_url, plan_at(next(counter)), model, cfg.request_timeout))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - t0
    outcomes.sort(key=lambda o: o.index)
    return outcomes, wall


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def oracle_fn(mode: str):
    from sglang_nemodiff.reference import ar_generate, fastdiffuser_generate

    return fastdiffuser_generate if mode == "fastdiffuser" else ar_generate


def verify(mode: str, outcomes: Sequence[Outcome], reference, eos_id: int, limit: int | None,
           seed: int) -> tuple[int, list[dict]]:
    """(outputs compared, mismatches) for the completed T=0 outputs with known prompt/output ids."""
    checkable = [o for o in outcomes if o.status == "completed" and not o.sampled and o.bad is None
                 and o.prompt_ids and o.output_ids is not None]
    if limit is not None and len(checkable) > limit:
        checkable = sorted(random.Random(seed).sample(checkable, limit), key=lambda o: o.index)
    generate, memo, mismatches = oracle_fn(mode), {}, []
    for o in checkable:
        key = (tuple(o.prompt_ids), o.max_new_tokens)
        if key not in memo:
            memo[key] = generate(reference, list(o.prompt_ids), o.max_new_tokens, eos_id=eos_id).tokens
        if o.output_ids != memo[key]:
            mismatches.append({"index": o.index, "api": o.api, "stream": o.stream, "prompt_len": len(o.prompt_ids),
                               "max_new_tokens": o.max_new_tokens, "got": o.output_ids[:40],
                               "expected": memo[key][:40]})
    return len(checkable), mismatches


def leak_lines(log_path: str | None) -> list[str]:
    """Server log lines where SGLang's KV checks reported a leak."""
    if not log_path or not os.path.exists(log_path):
        return []
    with open(log_path, errors="replace") as f:
        return [line.strip()[:300] for line in f if "leak detected" in line.lower()
                or "use-after-free" in line or "double free" in line]


def run_mode(mode: str, base_url: str, cfg: SoakConfig, *, tokenizer, reference, vocab_size: int,
             eos_id: int, proc=None, log_path: str | None = None, progress=print) -> dict:
    """Soak one running server (`base_url`, serving `mode`); returns the mode's figures."""
    import requests

    model = _get_json(base_url + "/v1/models")["data"][0]
    corpus = Corpus(tokenizer, vocab_size, int(model.get("max_model_len") or 4096), cfg.max_prompt, cfg.seed,
                    max(cfg.new_tokens))
    cases = bad_cases(corpus)
    watch = ServerWatch(base_url, proc)
    baseline, idle_before = wait_idle(base_url, cfg.idle_timeout, 1.0, watch.alive)
    if not idle_before:
        raise RuntimeError(f"{mode}: the server at {base_url} is not idle before the soak")
    progress(f"[soak] {mode}: {cfg.duration:.0f} s of load, {cfg.concurrency} clients")
    outcomes, wall = asyncio.run(_load(base_url, cfg, model["id"], lambda i: make_plan(i, cfg, corpus, cases),
                                       watch.alive))
    # Idle again with the starting number of used slots; if that never comes, what is left is leaked.
    idle, idle_reached = wait_idle(base_url, cfg.idle_timeout, cfg.idle_settle, watch.alive, _used(baseline))
    alive = watch.check()
    leaked = _used(idle) - _used(baseline) if alive and idle is not None else None
    healthy = False
    if alive:  # still generating after the idle check ran
        try:
            healthy = requests.get(base_url + "/health_generate", timeout=120).status_code == 200
        except requests.RequestException:
            pass
    progress(f"[soak] {mode}: load done ({len(outcomes)} requests); comparing T=0 outputs with the oracle")
    t0 = time.perf_counter()
    checked, mismatches = verify(mode, outcomes, reference, eos_id, cfg.verify_limit, cfg.seed)
    return summarize(mode, outcomes, wall, watch.deaths, leaked, checked, mismatches,
                     leak_reports=leak_lines(log_path), verify_s=time.perf_counter() - t0,
                     idle_reached=idle_reached, healthy_after=healthy)


def summarize(mode: str, outcomes: Sequence[Outcome], wall: float, deaths: int, leaked: int | None,
              checked: int, mismatches: list[dict], leak_reports: Sequence[str] = (),
              verify_s: float = 0.0, idle_reached: bool = True, healthy_after: bool = True) -> dict:
    by = {s: [o for o in outcomes if o.status == s] for s in ("completed", "rejected", "aborted", "error")}
    latencies = [o.latency_s for o in by["completed"]]
    errors = [{"index": o.index, "api": o.api, "stream": o.stream, "bad": o.bad, "http_status": o.http_status,
               "finish_reason": o.finish_reason, "detail": o.detail} for o in by["error"]]
    result = {
        "mode": mode, "sent": len(outcomes), "completed": len(by["completed"]),
        "rejected": len(by["rejected"]), "aborted": len(by["aborted"]), "errors": len(by["error"]),
        "rejected_bad": sum(o.bad is not None for o in by["rejected"]),
        "bad_cases": {name: sum(o.bad == name for o in outcomes) for name in sorted({o.bad for o in outcomes if o.bad})},
        "by_api": {api: sum(o.api == api for o in outcomes) for api in APIS},
        "streamed": sum(o.stream for o in outcomes),
        "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
        "output_tokens": sum(o.output_tokens for o in by["completed"]),
        "tokens_per_s": sum(o.output_tokens for o in by["completed"]) / wall if wall > 0 else None,
        "cached_prompt_tokens": sum(o.cached_tokens for o in outcomes),
        "wall_s": wall, "server_deaths": deaths, "idle_reached": idle_reached, "healthy_after": healthy_after,
        "leaked_kv_tokens": leaked,
        "checked": checked, "mismatches": len(mismatches), "verify_s": verify_s,
        "error_samples": errors[:10], "mismatch_samples": mismatches[:5],
        "leak_reports": list(leak_reports)[:5],
    }
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    return result


def failures(result: dict) -> list[str]:
    """The must-be-zero figures that are not zero (an unknown figure fails too)."""
    out = [f"{key}={result.get(key)}" for key in MUST_BE_ZERO if result.get(key) != 0]
    if not result.get("idle_reached", True):
        out.append("the KV pool did not settle back to its starting use after the load")
    if not result.get("healthy_after", True):
        out.append("the server did not generate after the load (/health_generate)")
    if result.get("leak_reports"):
        out.append(f"leak reports in the server log: {len(result['leak_reports'])}")
    if not result.get("completed"):
        out.append("no request completed")
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: Sequence[dict]) -> str:
    rows = ["| mode | sent | completed | rejected (4xx) | aborted (disconnect) | unexpected errors | "
            "p50 latency (s) | p99 latency (s) | output tok/s | server deaths / restarts | leaked KV slots | "
            "T=0 checked | T=0 differ from oracle | pass |",
            "|---|" + "---:|" * 12 + "---|"]
    for r in results:
        rejected = r['rejected']
        rows.append(f"| {r['mode']} | {r['sent']} | {r['completed']} | {rejected} | {r['aborted']} | "
                    f"{r['errors']} | {_f(r['p50_s'], '.2f')} | {_f(r['p99_s'], '.2f')} | "
                    f"{_f(r['tokens_per_s'], '.1f')} | {r['server_deaths']} | {_f(r['leaked_kv_tokens'], 'd')} | "
                    f"{r['checked']} | {r['mismatches']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(rows)


def markdown_report(results: Sequence[dict], meta: dict) -> str:
    cfg = meta["config"]
    lines = [
        f"Machine: {meta['machine']}. Model: `{meta['model']}`. Load average at start: {meta['loadavg']}.",
        f"Other load: {meta.get('note') or 'not stated'}; busy processes at start: "
        f"{'; '.join(meta.get('other_processes') or []) or 'none'}.",
        f"Load per mode: {cfg['duration']:.0f} s, {cfg['concurrency']} concurrent clients; prompts 1-"
        f"{cfg['max_prompt']} tokens ({cfg['shared_prefix_fraction']:.0%} on shared prefixes), "
        f"max_new_tokens in {list(cfg['new_tokens'])}; /generate, /v1/completions, /v1/chat/completions; "
        f"{cfg['stream_fraction']:.0%} of the rest streamed; {cfg['disconnect_fraction']:.0%} dropped mid-stream; "
        f"{cfg['bad_fraction']:.0%} invalid; {cfg['sampled_fraction']:.0%} at temperature > 0.",
        "",
        markdown_table(results),
    ]
    for r in results:
        for e in r["error_samples"][:3]:
            lines.append(f"- {r['mode']} error: {e}")
        for m in r["mismatch_samples"][:3]:
            lines.append(f"- {r['mode']} mismatch: {m}")
        for line in r["leak_reports"][:3]:
            lines.append(f"- {r['mode']} leak report: {line}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of ar,linearspec,fastdiffuser,quadratic")
    p.add_argument("--model-path", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--url", default=None, help="soak an already running server (one mode) instead of starting one")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load per mode")
    p.add_argument("--min-requests", type=int, default=d.min_requests,
                   help="keep sending past --duration until this many requests were sent")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-prompt", type=int, default=d.max_prompt)
    p.add_argument("--new-tokens", default=",".join(map(str, d.new_tokens)), help="max_new_tokens values to mix")
    p.add_argument("--stream-fraction", type=float, default=d.stream_fraction)
    p.add_argument("--disconnect-fraction", type=float, default=d.disconnect_fraction)
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction)
    p.add_argument("--sampled-fraction", type=float, default=d.sampled_fraction,
                   help="requests at temperature 0.8")
    p.add_argument("--shared-prefix-fraction", type=float, default=d.shared_prefix_fraction)
    p.add_argument("--request-timeout", type=float, default=d.request_timeout)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    p.add_argument("--verify-limit", type=int, default=None,
                   help="compare a fixed-seed sample of this many T=0 outputs with the oracle (default: all)")
    p.add_argument("--server-args", default="", help="extra launch_server flags, one string")
    p.add_argument("--cpu-bind", default=None,
                   help="SGLANG_CPU_OMP_THREADS_BIND for the server on CPU (default: the environment's, else "
                        "the last core; '0|1' for --tp 2 / --dp 2)")
    p.add_argument("--out", default="soak-results", help="directory for soak.json, soak.md and server logs")
    p.add_argument("--note", default="", help="what else ran on the machine (goes into the report)")
    return p


def config_from_args(a: argparse.Namespace) -> SoakConfig:
    return SoakConfig(duration=a.duration, concurrency=a.concurrency, seed=a.seed, max_prompt=a.max_prompt,
                      new_tokens=tuple(int(x) for x in a.new_tokens.split(",") if x.strip()),
                      stream_fraction=a.stream_fraction, disconnect_fraction=a.disconnect_fraction,
                      bad_fraction=a.bad_fraction, sampled_fraction=a.sampled_fraction,
                      shared_prefix_fraction=a.shared_prefix_fraction, request_timeout=a.request_timeout,
                      idle_timeout=a.idle_timeout, verify_limit=a.verify_limit,
                      min_requests=a.min_requests)


def server_env(cpu_bind: str | None) -> dict:
    """The server's environment: strict idle KV check; on CPU one bound core unless told otherwise
    (unbound OpenMP threads spin against other load and make forwards ~100x slower)."""
    env = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu_bind:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_bind
    elif not cuda_visible() and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = str((os.cpu_count() or 1) - 1)
    return env


def other_load(sample_s: float = 2.0) -> list[str]:
    """The other processes using CPU right now (name, %CPU), for the report's "other load"."""
    try:
        import psutil
    except ImportError:
        return []
    mine = {os.getpid()}
    procs = [p for p in psutil.process_iter(["pid", "cmdline", "name"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 10:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            busy.append((cpu, f"{cmd[:90]} ({cpu:.0f}% CPU)"))
    return [text for _, text in sorted(busy, reverse=True)]


def model_facts(model_path: str) -> tuple[int, int]:
    """(vocab size, EOS id) from the checkpoint's config.json."""
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    eos = config.get("eos_token_id", 11)
    return int(config["vocab_size"]), int(eos[0] if isinstance(eos, list) else eos)


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    import torch

    from sglang_nemodiff.reference import NLDReference
    from sglang_nemodiff.speedbench.client import load_tokenizer
    from sglang_nemodiff.speedbench.report import describe_machine, machine_info

    p = build_parser()
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {','.join(MODES)}")
    if a.url and len(modes) != 1:
        p.error("--url soaks one running server: give its mode in --modes")
    if a.url and not a.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("--url must be a loopback address")
    cfg = config_from_args(a)
    if a.model_path is None:
        from sglang_nemodiff.bundled import bundled_model_path

        a.model_path = bundled_model_path()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)  # the oracle runs here; leave the other cores to the server
    tokenizer = load_tokenizer(a.model_path)
    vocab_size, eos_id = model_facts(a.model_path)
    reference = NLDReference.from_pretrained(a.model_path)
    meta = {"machine": describe_machine(machine_info()), "model": a.model_path, "note": a.note,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "other_processes": other_load(),
            "config": dataclasses.asdict(cfg),
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join([sys.argv[0], *(argv or sys.argv[1:])])}
    results = []
    with sigterm_exits():
        for mode in modes:
            kwargs = dict(tokenizer=tokenizer, reference=reference, vocab_size=vocab_size, eos_id=eos_id)
            if a.url:
                results.append(run_mode(mode, a.url.rstrip("/"), cfg, **kwargs))
                continue
            server = ManagedServer(a.model_path, mode, ["--sleep-on-idle", *shlex.split(a.server_args)],
                                   log_path=os.path.join(a.out, f"server-{mode}.log"), env=server_env(a.cpu_bind))
            with server:
                print(f"[soak] {mode}: starting server ({server.log_path})", flush=True)
                server.wait_ready(timeout=900)
                results.append(run_mode(mode, server.url, cfg, proc=server.proc, log_path=server.log_path, **kwargs))
            print(markdown_table(results[-1:]), flush=True)
    report = markdown_report(results, meta)
    with open(os.path.join(a.out, "soak.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(a.out, "soak.md"), "w") as f:
        f.write(report)
    print(report)
    failed = {r["mode"]: r["failures"] for r in results if not r["ok"]}
    if failed:
        print(f"[soak] FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
