"""Shared fixtures: tiny NLD checkpoints in the real HF layout, the reference oracle, and real
SGLang servers (one per checkpoint and mode, started on first use, shared by the session)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from sglang_nemodiff.servers import CPU_ARGS as SERVER_CPU_ARGS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The oracle runs in this process: one thread, so it does not fight the servers for both cores.
torch.set_num_threads(1)

# The test servers run on CPU even where a GPU is visible (sglang_nemodiff.servers owns the flags).
# --sleep-on-idle: an idle scheduler otherwise busy-polls and takes a core from the others.
CPU_ARGS = (*SERVER_CPU_ARGS, "--skip-server-warmup", "--sleep-on-idle")
# LinearSpec servers run the oracle's fixed 32-token blocks unless a test passes its own
# --algorithm-config (the default, `block_size: auto`, changes B between rounds: same tokens,
# other forward counts).
BLOCK32 = ("--algorithm-config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "block32.yaml"))
# Quadratic rounds of b = 16 (the oracle's), not `auto`'s per-batch choice (tests of auto name it).
BLOCK16 = ("--algorithm-config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "block16.yaml"))
DENOISE_LORA = ("--algorithm-config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "denoise_lora.yaml"))
# A request's leaked KV slot turns into a hard error when the server is idle.
SERVER_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", "TOKENIZERS_PARALLELISM": "false"}

PROMPT_TEXTS = [
    "def add(a, b):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):",
    "The quick brown fox",
    "for i in range(10):\n    print(i * i)\n" * 3,
    "x",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY",
    "# Compute the factorial of n recursively\ndef factorial(n):\n    if n <= 1:\n        return 1\n" * 2,
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny NLD checkpoint with a draft LoRA (`linear_spec_lora/`)."""
    from sglang_nemodiff.checkpoint import write_random_checkpoint

    return write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-nld"), seed=0,
                                   lora_rank=8)


def bundled_with_random_lora(directory, rank: int = 8) -> str:
    """A copy of the bundled model whose draft adapter, for every mode, is a random one (drafts
    change, AR does not).
    Rank 8 stays a low-rank path in the server; rank >= 32 is merged into a draft o_proj."""
    import shutil

    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.checkpoint import write_random_lora
    from sglang_nemodiff.reference import NLDReference

    path = os.path.join(str(directory), "nld-tiny-lora")
    # the random adapter is every mode's: without the quadratic one (checkpoint.adapter_dir)
    shutil.copytree(bundled_model_path(), path, ignore=shutil.ignore_patterns("quadratic_lora"))
    write_random_lora(os.path.join(path, "linear_spec_lora"), NLDReference.from_pretrained(path).config,
                      rank=rank, seed=7, scale=0.5)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Eight prompts of different lengths, as token ids (1 to ~100 tokens)."""
    return [tokenizer(text).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from sglang_nemodiff.reference import NLDReference

    return NLDReference.from_pretrained(tiny_checkpoint)


class ServerPool:
    """Servers keyed by (checkpoint, mode, args), started on first use. Fixtures call `get` per
    test, so a stopped server is started again if needed; every start is recorded (`starts`,
    printed at the end of the run): starting servers is the suite's largest cost.

    Resident: the plain servers of the tiny random checkpoint (ar, linearspec at B = 32,
    fastdiffuser, quadratic at b = 16), which test files from a to z come back to; once started they stay.
    Of the others (variants one file or two use) at most `max_others` run at once, least
    recently used stopping first: each costs ~1 GB, and idle ones sleep (--sleep-on-idle, ~5%
    of a core). With one LRU of four for all, the plain four were restarted 14 times in a run
    (~25 s each) as the variants pushed them out."""

    RESIDENT = {("ar", ()), ("linearspec", BLOCK32), ("fastdiffuser", ()), ("quadratic", BLOCK16)}

    def __init__(self, log_dir, max_others: int = 3):
        self.log_dir = log_dir
        self.max_others = max_others
        self.servers = {}
        self.started = 0
        self.starts = []  # (key, test that asked, seconds to ready)

    @classmethod
    def resident(cls, key) -> bool:
        model_path, algorithm, extra, env = key
        return os.path.basename(model_path) == "tiny-nld" and not env and (algorithm, extra) in cls.RESIDENT

    def get(self, model_path: str, algorithm: str, *extra: str, env: dict | None = None):
        from sglang_nemodiff.servers import ManagedServer

        env = env or {}
        if not any(a.startswith("--algorithm-config") for a in extra):
            extra = (*extra, *{"linearspec": BLOCK32, "quadratic": BLOCK16}.get(algorithm, ()))
        key = (model_path, algorithm, extra, tuple(sorted(env.items())))
        if key in self.servers and self.servers[key].proc.poll() is not None:
            # Gone: an in-process sgl.Engine's shutdown kills every child of this process.
            self.servers.pop(key).stop()
        if key in self.servers:
            self.servers[key] = self.servers.pop(key)  # most recently used last
        else:
            others = [k for k in self.servers if not self.resident(k)]
            while not self.resident(key) and len(others) >= self.max_others:
                self.servers.pop(others.pop(0)).stop()
            self.started += 1
            name = f"{self.started:02d}-{os.path.basename(model_path)}-{algorithm}.log"
            # One core and one torch thread per server (servers alternate between the cores):
            # two OpenMP threads per process on a shared 2-core machine make every matmul spin.
            # NEMODIFF_TEST_CORES (e.g. "0") keeps the servers off cores busy with other work.
            cores = os.environ.get("NEMODIFF_TEST_CORES", "").split(",") if os.environ.get(
                "NEMODIFF_TEST_CORES") else [str(c) for c in range(os.cpu_count() or 1)]
            core = {"SGLANG_CPU_OMP_THREADS_BIND": cores[self.started % len(cores)]}
            started = time.monotonic()
            for attempt in range(3):
                server = ManagedServer(model_path, algorithm, [*CPU_ARGS, *extra],
                                       log_path=str(self.log_dir / name),
                                       env={**os.environ, **SERVER_ENV, **core, **env})
                server.start()
                try:
                    server.wait_ready(timeout=600)
                    break
                except Exception:
                    server.stop()
                    if attempt == 2 or not server.port_taken():
                        raise  # a port another process took first: start again on another one
            self.starts.append((key, os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
                                time.monotonic() - started))
            self.servers[key] = server
        return self.servers[key]

    def stop_all(self):
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory):
    pool = ServerPool(tmp_path_factory.mktemp("server-logs"))
    _POOLS.append(pool)
    yield pool
    pool.stop_all()


_POOLS = []  # the session's pool, for the summary below


def pytest_terminal_summary(terminalreporter):
    """How much of the run went into starting pooled servers (the suite's largest cost)."""
    starts = [start for pool in _POOLS for start in pool.starts]
    if not starts:
        return
    keys = {key for key, _, _ in starts}
    seconds = sum(s for _, _, s in starts)
    terminalreporter.write_line(f"server pool: {len(starts)} starts of {len(keys)} configurations, "
                                f"{seconds:.0f} s to ready")
    for key, test, s in starts:
        model, algorithm, extra, env = key
        args = " ".join(os.path.basename(a) for a in extra)
        terminalreporter.write_line(f"  {s:5.1f} s  {os.path.basename(model)} {algorithm} {args} {dict(env) or ''} <- {test}")


@pytest.fixture
def ar_server(server_pool, tiny_checkpoint):
    return server_pool.get(tiny_checkpoint, "ar")


@pytest.fixture
def linearspec_server(server_pool, tiny_checkpoint):
    return server_pool.get(tiny_checkpoint, "linearspec")


@pytest.fixture
def fastdiffuser_server(server_pool, tiny_checkpoint):
    return server_pool.get(tiny_checkpoint, "fastdiffuser")


def generate(server, input_ids, max_new_tokens=24, **params):
    """Greedy /generate; returns the JSON response."""
    import requests

    payload = {"input_ids": input_ids,
               "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, **params}}
    response = requests.post(server.url + "/generate", json=payload, timeout=300)
    response.raise_for_status()
    return response.json()


def generate_many(server, prompts, max_new_tokens=24, **params):
    """All prompts at once (concurrently), responses in prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: generate(server, ids, max_new_tokens, **params), prompts))


def generate_batch(server, prompts, max_new_tokens=24, **params):
    """All prompts in one batched /generate call, responses in prompt order. Pre-tokenized, the
    batch reaches the scheduler as one message: its first round sees every request, however fast
    or loaded the machine is. (generate_many's concurrent clients arrive over several rounds.)"""
    import requests

    payload = {"input_ids": [list(ids) for ids in prompts],
               "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, **params}}
    response = requests.post(server.url + "/generate", json=payload, timeout=300)
    response.raise_for_status()
    responses = response.json()
    assert isinstance(responses, list) and len(responses) == len(prompts), responses
    return responses


def meta(response, key):
    """A plugin meta_info value (request-level values arrive as one-element lists)."""
    value = response["meta_info"].get(key)
    return value[-1] if isinstance(value, list) else value




def abort_mid_generation(server, prompts, n_requests: int, max_new_tokens: int, tag: str) -> list:
    """n_requests long greedy requests, all aborted mid-generation through /abort_request; the
    finish reason types of those that answered. The server stays up for the caller's checks."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def long_request(i):
        try:
            return requests.post(server.url + "/generate", timeout=120, json={
                "rid": f"{tag}-{i}", "input_ids": prompts[i % len(prompts)],
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                    "ignore_eos": True}}).json()
        except requests.RequestException as exc:
            return {"error": str(exc)}

    with ThreadPoolExecutor(n_requests) as pool:
        futures = [pool.submit(long_request, i) for i in range(n_requests)]
        time.sleep(1.5)
        # Abort in passes until every request has returned: on a loaded machine a request can
        # reach the server after its first abort (an abort of an unknown rid is a no-op).
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            for i, f in enumerate(futures):
                if not f.done():
                    requests.post(server.url + "/abort_request", json={"rid": f"{tag}-{i}"}, timeout=30)
            time.sleep(0.5)
        results = [f.result() for f in futures]
    return [r["meta_info"]["finish_reason"]["type"] for r in results if "meta_info" in r]


def openai_defaults_answer(server):
    """An OpenAI client that sends no temperature (default 1.0) gets an answer."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    completion = client.completions.create(model="m", prompt="import os\n", max_tokens=16)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0
    chat = client.chat.completions.create(model="m", max_tokens=16, messages=[
        {"role": "user", "content": "Repeat the code: x = 1"}])
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0


# Files whose servers take both cores (they stop every pooled server first): run last, so the
# pool's resident servers are started once for all the other files (test_router.py ran between
# test_robustness.py and test_sampling.py and cost four resident restarts, ~2 minutes).
RUN_LAST = ("test_router.py", "test_tensor_parallel.py")


def pytest_collection_modifyitems(config, items):
    def last(item):
        name = os.path.basename(str(item.fspath))
        return RUN_LAST.index(name) + 1 if name in RUN_LAST else 0

    items.sort(key=last)  # stable: the order within each group is kept
