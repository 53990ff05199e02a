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

from conftest import BLOCK32, CPU_ARGS, DENOISE_LORA, SERVER_ENV, bundled_with_random_lora, generate, generate_many, meta
from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.reference import NLDReference, ar_generate, fastdiffuser_generate, linearspec_generate

pytestmark = pytest.mark.slow
MAX_NEW = 48

MERGED = "tp2-fastdiffuser"  # the case served from the rank-32 (merged) adapter, denoise_lora on

CASES = {  # case: (mode, parallel flags); LinearSpec at the oracle's fixed 32-token blocks
    "tp2-ar": ("ar", ("--tp", "2")),
    "tp2-linearspec": ("linearspec", ("--tp", "2")),
    MERGED: ("fastdiffuser", ("--tp", "2", *DENOISE_LORA)),
    "dp2-linearspec": ("linearspec", ("--dp", "2")),
    # block_size: auto (the default): rank 0's block size per round, broadcast to rank 1; AR's tokens
    "tp2-linearspec-auto": ("linearspec", ("--tp", "2")),
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
            else:
                fn = lambda ids: fastdiffuser_generate(lora_reference, ids, MAX_NEW, eos_id=11)  # noqa: E731
            results[mode] = [fn(ids) for ids in parallel_prompts]
        return results[mode]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def parallel_server(request, server_pool, lora_checkpoint, merged_checkpoint, tmp_path_factory):
    from sglang_nemodiff.servers import ManagedServer

    mode, flags = CASES[request.param]
    server_pool.stop_all()  # the two ranks take both cores; the pool restarts its servers on demand
    # One core per rank (SGLang on CPU otherwise binds one rank per NUMA node, here one for both).
    env = {**os.environ, **SERVER_ENV, "SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
    log = tmp_path_factory.mktemp("parallel-logs") / f"{request.param}.log"
    extra = BLOCK32 if mode == "linearspec" and not request.param.endswith("auto") else ()
    checkpoint = merged_checkpoint if request.param == MERGED else lora_checkpoint
    server = ManagedServer(checkpoint, mode, [*CPU_ARGS, *extra, *flags], log_path=str(log), env=env)
    server.case = request.param
    with server:
        server.wait_ready(timeout=900)
        yield server


def test_equals_the_oracle(parallel_server, parallel_prompts, oracle):
    """All requests at once, then the same one by one (radix cache hits under TP): the oracle's
    tokens every time; in the diffusion modes also its forwards (LinearSpec: the draft LoRA's
    acceptance). Forwards are compared one by one: a batched FastDiffuser block steps until every
    block of the batch is done, and each request counts the batch's steps."""
    mode = parallel_server.algorithm
    expected = oracle("fastdiffuser-merged" if parallel_server.case == MERGED else mode)
    tokens = [r.tokens for r in (oracle("ar") if mode == "linearspec" else expected)]
    together = generate_many(parallel_server, parallel_prompts, MAX_NEW)
    one_by_one = [generate(parallel_server, ids, MAX_NEW) for ids in parallel_prompts]
    assert [r["output_ids"] for r in together] == tokens
    assert [r["output_ids"] for r in one_by_one] == tokens
    if parallel_server.case.startswith("tp2"):  # DP round-robin may send a prompt to the other replica
        assert all(r["meta_info"]["cached_tokens"] > 0 for r in one_by_one)
    if mode != "ar" and not parallel_server.case.endswith("auto"):
        assert [meta(r, "nemodiff_forwards") for r in one_by_one] == [e.forwards for e in expected]
    print(f"{parallel_server.case}: forwards {[meta(r, 'nemodiff_forwards') for r in one_by_one]}")


def test_draft_lora_matters_and_every_rank_serves(parallel_server, lora_reference, parallel_prompts, oracle):
    """LinearSpec's forward counts would differ without the LoRA (so the check above sees it); each
    TP rank loaded the LoRA; with DP both replicas took requests."""
    case, mode = parallel_server.case, parallel_server.algorithm
    log = open(parallel_server.log_path, errors="replace").read()
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
