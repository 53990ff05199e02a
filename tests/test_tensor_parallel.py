"""`--tp 2` (gloo groups, patches/cpu_parallel_groups.py) and `--dp 2` on CPU, in every mode: the
sharded or replicated servers give the unsharded oracle's tokens (LinearSpec == AR, FastDiffuser ==
its reference) and spend the oracle's forwards.

The checkpoint is the bundled (trained) model with a random draft LoRA: its drafts get accepted, and
the LoRA changes which, so LinearSpec's forward counts under TP check the LoRA's sharding (A is
row-parallel over the attention output like o_proj, B replicated) and not only the verify pass.
The FastDiffuser case denoises with the draft adapter (`denoise_lora: true`) of rank 32, which
the server merges into each rank's draft o_proj shard (W_shard + scale * B @ A_shard): its tokens
depend on the adapter, so a wrongly sharded merge cannot pass.
One server at a time (a 2-rank server takes both cores), shared by the tests of its case."""

import os

import pytest
import requests

from conftest import BLOCK16, BLOCK32, CPU_ARGS, DENOISE_LORA, SERVER_ENV, bundled_with_random_lora, generate, generate_many, meta
from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.reference import (
    NLDReference,
    ar_generate,
    fastdiffuser_generate,
    linearspec_generate,
    quadratic_generate,
)

pytestmark = pytest.mark.slow
MAX_NEW = 48

MERGED = "tp2-fastdiffuser"  # the case served from the rank-32 (merged) adapter, denoise_lora on

METRICS = ("--enable-metrics",)  # test_metrics_count_each_request_once
NODES2 = ("--nnodes", "2")  # the fixture starts node ranks 0 and 1 with a --dist-init-addr

CASES = {  # case: (mode, parallel flags); LinearSpec at the oracle's fixed 32-token blocks
    "tp2-ar": ("ar", ("--tp", "2", *METRICS)),
    "tp2-linearspec": ("linearspec", ("--tp", "2", *METRICS)),
    MERGED: ("fastdiffuser", ("--tp", "2", *DENOISE_LORA, *METRICS)),
    "dp2-linearspec": ("linearspec", ("--dp", "2", *METRICS)),
    # block_size: auto (the default): rank 0's block size per round, broadcast to rank 1; AR's tokens
    "tp2-linearspec-auto": ("linearspec", ("--tp", "2", *METRICS)),
    "tp2-quadratic": ("quadratic", ("--tp", "2", *METRICS)),
    # quadratic's auto: rank 0's round shape (block size and groups) broadcast to rank 1
    "tp2-quadratic-auto": ("quadratic", ("--tp", "2", *METRICS)),
    # Two "nodes" (two launch_server processes, one TP rank each, gloo over loopback)
    "nodes2-ar": ("ar", ("--tp", "2", *NODES2, *METRICS)),
    "nodes2-linearspec": ("linearspec", ("--tp", "2", *NODES2, *METRICS)),
    "nodes2-fastdiffuser": ("fastdiffuser", ("--tp", "2", *NODES2, *METRICS)),
}


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    return bundled_with_random_lora(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def lora_reference(lora_checkpoint):
    return NLDReference.from_pretrained(lora_checkpoint)


@pytest.fixture(scope="module")
def merged_checkpoint(tmp_path_factory):
    return bundled_with_random_lora(tmp_path_factory.mktemp("parallel-merged"), rank=32)


@pytest.fixture(scope="module")
def parallel_prompts():
    """Eight held-out code prompts (continuations and edits) on which the bundled model's drafts hit."""
    from transformers import AutoTokenizer

    from sglang_nemodiff.tools.training import heldout_prompt_sets

    sets = heldout_prompt_sets(AutoTokenizer.from_pretrained(bundled_model_path()), n_per_set=4,
                               continuation_tokens=96)
    return [p.input_ids for p in sets["continuation"] + sets["edit"]]


@pytest.fixture(scope="module")
def oracle(lora_reference, merged_checkpoint, parallel_prompts):
    """mode -> the oracle's GenerationResult per prompt (computed once, shared by the cases);
    "fastdiffuser-merged": FastDiffuser denoising with the rank-32 adapter."""
    results = {}

    def get(mode):
        if mode not in results:
            if mode == "fastdiffuser-merged":
                merged = NLDReference.from_pretrained(merged_checkpoint)
                fn = lambda ids: fastdiffuser_generate(merged, ids, MAX_NEW, eos_id=11,  # noqa: E731
                                                       use_draft_lora=True)
            elif mode == "ar":
                fn = lambda ids: ar_generate(lora_reference, ids, MAX_NEW, eos_id=11)  # noqa: E731
            elif mode == "linearspec":
                fn = lambda ids: linearspec_generate(lora_reference, ids, MAX_NEW, 11)  # noqa: E731
            elif mode == "quadratic":
                fn = lambda ids: quadratic_generate(lora_reference, ids, MAX_NEW, 11)  # noqa: E731
            else:
                fn = lambda ids: fastdiffuser_generate(lora_reference, ids, MAX_NEW, eos_id=11)  # noqa: E731
            results[mode] = [fn(ids) for ids in parallel_prompts]
        return results[mode]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def parallel_server(request, server_pool, lora_checkpoint, merged_checkpoint, tmp_path_factory):
    from sglang_nemodiff.servers import ManagedServer, free_port

    mode, flags = CASES[request.param]
    server_pool.stop_all()  # the two ranks take both cores; the pool restarts its servers on demand
    logs = tmp_path_factory.mktemp("parallel-logs")
    extra = () if request.param.endswith("auto") else {"linearspec": BLOCK32, "quadratic": BLOCK16}.get(mode, ())
    checkpoint = merged_checkpoint if request.param == MERGED else lora_checkpoint
    if "--nnodes" in flags:
        # One process per node, one TP rank each, one core each; each serves HTTP on its own port
        # (node 0's answers); TP groups over gloo at --dist-init-addr.
        addr = f"127.0.0.1:{free_port()}"
        servers = [ManagedServer(checkpoint, mode, [*CPU_ARGS, *extra, *flags, "--node-rank", str(rank),
                                                    "--dist-init-addr", addr],
                                 log_path=str(logs / f"{request.param}-node{rank}.log"),
                                 env={**os.environ, **SERVER_ENV, "SGLANG_CPU_OMP_THREADS_BIND": str(rank)})
                   for rank in (0, 1)]
    else:
        # One core per rank (SGLang on CPU otherwise binds one rank per NUMA node, here one for both).
        env = {**os.environ, **SERVER_ENV, "SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
        servers = [ManagedServer(checkpoint, mode, [*CPU_ARGS, *extra, *flags],
                                 log_path=str(logs / f"{request.param}.log"), env=env)]
    server = servers[0]
    server.case = request.param
    server.all_logs = [s.log_path for s in servers]
    try:
        for s in servers:
            s.start()
        server.wait_ready(timeout=900)
        yield server
    finally:
        for s in servers:
            s.stop()


def test_equals_the_oracle(parallel_server, parallel_prompts, oracle):
    """All requests at once, then the same one by one (radix cache hits under TP): the oracle's
    tokens every time; in the diffusion modes also its forwards (LinearSpec: the draft LoRA's
    acceptance). Forwards are compared one by one: a batched FastDiffuser block steps until every
    block of the batch is done, and each request counts the batch's steps."""
    mode = parallel_server.algorithm
    expected = oracle("fastdiffuser-merged" if parallel_server.case == MERGED else mode)
    tokens = [r.tokens for r in (oracle("ar") if mode in ("linearspec", "quadratic") else expected)]
    together = generate_many(parallel_server, parallel_prompts, MAX_NEW)
    one_by_one = [generate(parallel_server, ids, MAX_NEW) for ids in parallel_prompts]
    assert [r["output_ids"] for r in together] == tokens
    assert [r["output_ids"] for r in one_by_one] == tokens
    if not parallel_server.case.startswith("dp2"):  # DP round-robin may send a prompt to the other replica
        assert all(r["meta_info"]["cached_tokens"] > 0 for r in one_by_one)
    if mode != "ar" and not parallel_server.case.endswith("auto"):
        assert [meta(r, "nemodiff_forwards") for r in one_by_one] == [e.forwards for e in expected]
    print(f"{parallel_server.case}: forwards {[meta(r, 'nemodiff_forwards') for r in one_by_one]}")


def test_draft_lora_matters_and_every_rank_serves(parallel_server, lora_reference, parallel_prompts, oracle):
    """LinearSpec's forward counts would differ without the LoRA (so the check above sees it); each
    TP rank loaded the LoRA; with DP both replicas took requests."""
    case, mode = parallel_server.case, parallel_server.algorithm
    log = "".join(open(path, errors="replace").read() for path in parallel_server.all_logs)
    if parallel_server.case.endswith("auto"):
        # Each rank runs the policy on its own timings; the rounds use rank 0's choice (ranks
        # running different block sizes could not finish a forward together).
        assert all(f"{rank}] [nemodiff] block size" in log for rank in ("TP0", "TP1"))
    elif case == MERGED:
        # the premise: each rank merged its shard of the adapter, and the adapter changes tokens
        assert log.count("merged into a draft o_proj") == 2
        assert [e.tokens for e in oracle("fastdiffuser-merged")] != [e.tokens for e in oracle("fastdiffuser")]
    elif mode == "linearspec":
        without = [linearspec_generate(lora_reference, ids, MAX_NEW, 11, use_draft_lora=False).forwards
                   for ids in parallel_prompts]
        assert without != [e.forwards for e in oracle("linearspec")]
        assert log.count("Loaded draft-only LoRA") == 2  # one per rank (TP shard or DP replica)
    if case.startswith("dp2"):
        loads = requests.get(parallel_server.url + "/v1/loads", timeout=60).json()["loads"]
        assert sorted(load["dp_rank"] for load in loads) == [0, 1]
        assert all(load["total_prefill_uncached_tokens"] > 0 for load in loads), loads


def scrape(server) -> dict:
    """/metrics as {(sample name, frozenset of labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=60).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def nemodiff_deltas(before: dict, after: dict) -> dict:
    """The plugin's samples that moved, by (name, labels without model_name/algorithm)."""
    out = {}
    for (name, labels), value in after.items():
        if name.startswith("nemodiff_") and not name.endswith("_created"):
            moved = value - before.get((name, labels), 0.0)
            rest = frozenset((k, v) for k, v in labels if k not in ("model_name", "algorithm"))
            if moved:
                out[(name, rest)] = moved
    return out


def test_metrics_count_each_request_once(parallel_server, parallel_prompts):
    """With --enable-metrics the plugin's counters move by exactly the sums of the requests'
    meta_info: under TP once (not once per rank), under DP summed over the replicas. Negative
    control: AR mode moves no diffusion series while SGLang's own token counter moves."""
    case, mode = parallel_server.case, parallel_server.algorithm
    prompts = parallel_prompts[:4]
    before = scrape(parallel_server)
    responses = generate_many(parallel_server, prompts, MAX_NEW)
    after = scrape(parallel_server)
    deltas = nemodiff_deltas(before, after)
    generated = sum(v for (name, _), v in after.items() if name == "sglang:generation_tokens_total") \
        - sum(v for (name, _), v in before.items() if name == "sglang:generation_tokens_total")
    completion = sum(r["meta_info"]["completion_tokens"] for r in responses)
    assert generated == completion  # the scrape sees this server's work
    if mode == "ar":
        assert deltas == {}
        return
    labels = {k: v for (name, ls) in after for k, v in ls if name == "nemodiff_requests_total"}
    assert labels["algorithm"] == mode and labels["model_name"]

    def moved(name, **labels):
        return deltas.get((name, frozenset(labels.items())), 0.0)

    assert moved("nemodiff_requests_total") == len(prompts)
    assert moved("nemodiff_committed_tokens_total") == completion
    per_pass = {}
    for r in responses:
        for kind, n in meta(r, "nemodiff_forwards_per_pass").items():
            per_pass[kind] = per_pass.get(kind, 0) + n
    expected_kinds = {"linearspec": {"prefill", "draft", "verify"}, "quadratic": {"prefill", "quadratic"},
                      "fastdiffuser": {"prefill", "denoise", "refresh"}}[mode]
    if case.endswith("auto"):  # the policy may take AR steps only, blocks only, or both
        if mode == "quadratic":  # and, in the quadratic mode, LinearSpec rounds
            expected_kinds |= {"draft", "verify"}
        assert "prefill" in per_pass and set(per_pass) <= expected_kinds | {"ar_step"}
    else:
        assert set(per_pass) == expected_kinds
    assert {k: moved("nemodiff_forwards_total", pass_kind=k) for k in per_pass} == per_pass
    assert sum(per_pass.values()) == sum(meta(r, "nemodiff_forwards") for r in responses)
    sizes = {}
    for r in responses:
        for size, n in meta(r, "nemodiff_blocks_per_size").items():
            sizes[size] = sizes.get(size, 0) + n
    assert {s: moved("nemodiff_blocks_total", block_size=s) for s in sizes} == sizes
    assert moved("nemodiff_tokens_per_forward_count") == len(prompts)
    tpf = sum(meta(r, "nemodiff_tokens_per_forward") for r in responses)
    assert abs(moved("nemodiff_tokens_per_forward_sum") - tpf) < 1e-3
    if mode in ("linearspec", "quadratic"):
        blocks = sum(n for size, n in sizes.items() if size != "1")  # AR steps draft nothing
        accepted = sum((meta(r, "nemodiff_accept_length") - 1) * meta(r, "nemodiff_blocks")
                       for r in responses)
        assert moved("nemodiff_accepted_drafts_count") == blocks
        assert abs(moved("nemodiff_accepted_drafts_sum") - accepted) < 1e-2 * len(prompts)
