"""LinearSpec through the real SGLang runtime: identical to AR, 2 forwards per block, radix cache,
draft LoRA, robustness (stop strings, streaming, 400s, aborts)."""

import json
import time

import pytest
import requests

from conftest import abort_mid_generation, generate, generate_many, meta
from sglang_nemodiff.reference import ar_generate, linearspec_generate

pytestmark = pytest.mark.slow


def test_equals_ar_batch1_and_concurrent(linearspec_server, reference, prompts):
    """The core promise: LinearSpec output == AR greedy, one by one and 8 at a time."""
    expected = [ar_generate(reference, ids, 40, eos_id=11).tokens for ids in prompts]
    sequential = [generate(linearspec_server, ids, 40) for ids in prompts]
    assert [r["output_ids"] for r in sequential] == expected
    concurrent = generate_many(linearspec_server, prompts, 40)
    assert [r["output_ids"] for r in concurrent] == expected
    for ids, response in zip(prompts, sequential):
        ref = linearspec_generate(reference, ids, 40, eos_id=11)  # draft LoRA on, as served
        assert meta(response, "nemodiff_algorithm") == "linearspec"
        # Exactly 2 forwards per block (+1 prefill), the same blocks as the oracle.
        assert meta(response, "nemodiff_forwards") == ref.forwards == 1 + 2 * meta(response, "nemodiff_blocks")
        assert meta(response, "nemodiff_tokens_per_forward") == pytest.approx(ref.tokens_per_forward, abs=1e-3)
        assert meta(response, "nemodiff_accept_length") == pytest.approx(
            sum(ref.accept_lengths) / len(ref.accept_lengths) + 1, abs=1e-3)


def test_shared_prefix_reuses_radix_cache(linearspec_server, ar_server, tokenizer):
    shared = tokenizer("# Shared header for both requests\n" + "value = compute(x, y)\n" * 8).input_ids
    assert len(shared) >= 64
    first = shared + tokenizer("print('first')").input_ids
    second = shared + tokenizer("print('second one')").input_ids
    out_first = generate(linearspec_server, first, 24)
    out_second = generate(linearspec_server, second, 24)
    assert out_second["meta_info"]["cached_tokens"] >= 64
    assert out_first["output_ids"] == generate(ar_server, first, 24)["output_ids"]
    assert out_second["output_ids"] == generate(ar_server, second, 24)["output_ids"]
    again = generate(linearspec_server, first, 24)
    assert again["output_ids"] == out_first["output_ids"] and again["meta_info"]["cached_tokens"] > 0


def test_stop_strings_max_tokens_and_eos_like_ar(linearspec_server, ar_server, prompts, tokenizer):
    ids = prompts[5]
    ar_text = generate(ar_server, ids, 40)["text"]
    stop = ar_text[12:15]
    assert stop
    for params in ({"stop": [stop]}, {"max_new_tokens": 7}, {"max_new_tokens": 33},
                   {"stop_token_ids": [generate(ar_server, ids, 40)["output_ids"][9]]}):
        params = {"max_new_tokens": 40, **params}
        n = params.pop("max_new_tokens")
        ar = generate(ar_server, ids, n, **params)
        spec = generate(linearspec_server, ids, n, **params)
        assert spec["text"] == ar["text"] and spec["output_ids"] == ar["output_ids"], params
        assert spec["meta_info"]["finish_reason"] == ar["meta_info"]["finish_reason"]
        assert spec["meta_info"]["completion_tokens"] == ar["meta_info"]["completion_tokens"]


@pytest.mark.parametrize("mode", ["linearspec", "quadratic"])
def test_streaming_matches_non_streaming(server_pool, tiny_checkpoint, prompts, mode):
    linearspec_server = server_pool.get(tiny_checkpoint, mode)
    ids = prompts[2]
    full = generate(linearspec_server, ids, 40)
    chunks = []
    with requests.post(linearspec_server.url + "/generate", stream=True, timeout=300, json={
            "input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 40}}) as response:
        for line in response.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunks.append(json.loads(line[5:]))
    assert len(chunks) > 1
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"]  # never over-emitted
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert chunks[-1]["meta_info"]["completion_tokens"] == len(full["output_ids"]) <= 40


def test_parallel_sampling_n(linearspec_server, ar_server):
    """n > 1 as AR mode does it: n outputs per prompt (at T=0 all equal to AR's)."""
    body = {"text": "def add(a, b):", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "n": 2}}
    spec = requests.post(linearspec_server.url + "/generate", timeout=120, json=body).json()
    ar = requests.post(ar_server.url + "/generate", timeout=120, json=body).json()
    assert len(spec) == len(ar) == 2
    assert [o["output_ids"] for o in spec] == [o["output_ids"] for o in ar]


def test_openai_logprobs_equal_ar(linearspec_server, ar_server):
    def logprobs(server):
        response = requests.post(server.url + "/v1/completions", timeout=60, json={
            "model": "x", "prompt": "hello", "max_tokens": 6, "temperature": 0, "logprobs": 2})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]

    spec, ar = logprobs(linearspec_server), logprobs(ar_server)
    assert spec["tokens"] == ar["tokens"]
    assert spec["token_logprobs"] == pytest.approx(ar["token_logprobs"], abs=1e-4)
    assert [sorted(d) for d in spec["top_logprobs"]] == [sorted(d) for d in ar["top_logprobs"]]


def test_aborted_requests_free_their_kv(linearspec_server, prompts):
    """50 requests aborted mid-generation; the strict idle KV check would kill a leaking server."""
    url = linearspec_server.url
    finished = abort_mid_generation(linearspec_server, prompts, 50, 400, "abort")
    assert finished.count("abort") >= 40, finished
    time.sleep(3)  # idle: SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE checks the pool here
    assert requests.get(url + "/health_generate", timeout=60).status_code == 200
    assert len(generate(linearspec_server, prompts[0], 8)["output_ids"]) == 8


def test_frontend_gen_and_select_equal_ar(linearspec_server, ar_server):
    import sglang as sgl

    @sgl.function
    def program(s):
        s += "def add(a, b):"
        s += sgl.gen("body", max_tokens=12, temperature=0)
        s += "Is the sky blue? "
        s += sgl.select("choice", choices=["yes", "no", "maybe"])

    spec = program.run(backend=sgl.RuntimeEndpoint(linearspec_server.url))
    ar = program.run(backend=sgl.RuntimeEndpoint(ar_server.url))
    assert spec.error() is None, spec.error()
    assert spec["body"] == ar["body"] and spec["choice"] == ar["choice"]
    assert spec.get_meta_info("choice")["normalized_prompt_logprobs"] == pytest.approx(
        ar.get_meta_info("choice")["normalized_prompt_logprobs"], abs=1e-4)


@pytest.fixture
def ar_server_in_order(server_pool, tiny_checkpoint):
    """AR with SGLang's overlap scheduler off. With it on (the default), SGLang 0.5.23's
    penalizers see each output token one step late (a token can repeat right after itself under
    a repetition penalty); without it they count every token generated so far, which is the
    semantics LinearSpec implements."""
    return server_pool.get(tiny_checkpoint, "ar", "--disable-overlap-schedule")


@pytest.mark.parametrize("params", [
    {"frequency_penalty": 0.6, "presence_penalty": 0.4},
    {"repetition_penalty": 1.3},
    {"logit_bias": {"200": 5.0, "201": -100.0}},
    # Frequency and repetition together: their order matters (patches/penalizer_order.py; before
    # it, SGLang's AR applied them in a per-process order and this case failed 2 runs in 5).
    {"frequency_penalty": 0.3, "repetition_penalty": 1.1, "logit_bias": {"150": 2.5}},
])
@pytest.mark.parametrize("mode", ["linearspec", "quadratic"])
def test_penalties_and_bias_equal_ar(server_pool, tiny_checkpoint, ar_server_in_order, prompts, params, mode):
    """Slot i of the verify pass (quadratic: of the block rows) is penalised as if drafts 1..i-1
    were generated: at T=0 the output equals AR mode with the same penalties (and differs from
    the unpenalised output)."""
    server = server_pool.get(tiny_checkpoint, mode)
    for ids in prompts[:4]:
        ar = generate(ar_server_in_order, ids, 40, **params)["output_ids"]
        assert generate(server, ids, 40, **params)["output_ids"] == ar, params
    assert ar != generate(ar_server_in_order, prompts[3], 40)["output_ids"]


@pytest.mark.parametrize("mode", ["linearspec", "quadratic"])
def test_min_new_tokens_blocks_stop_tokens_like_ar(server_pool, tiny_checkpoint, ar_server_in_order, prompts, mode):
    linearspec_server = server_pool.get(tiny_checkpoint, mode)
    ids = prompts[2]
    plain = generate(ar_server_in_order, ids, 40)["output_ids"]
    params = {"stop_token_ids": [plain[3]], "min_new_tokens": 12}
    ar = generate(ar_server_in_order, ids, 40, **params)
    spec = generate(linearspec_server, ids, 40, **params)
    assert spec["output_ids"] == ar["output_ids"] and len(ar["output_ids"]) >= 12
    assert spec["meta_info"]["finish_reason"] == ar["meta_info"]["finish_reason"]


def test_sglang_dllm_algorithm_spelling_starts_the_same_server(linearspec_server, server_pool,
                                                               tiny_checkpoint, prompts):
    """SGLang's own flag, `--dllm-algorithm NemodiffLinearSpec --dllm-algorithm-config X`, starts
    the server `--algorithm linearspec --algorithm-config X` starts: same server arguments as
    /server_info reports them, same tokens and forwards for every request at once."""
    from conftest import BLOCK32

    sglangs = server_pool.get(tiny_checkpoint, None, "--dllm-algorithm", "NemodiffLinearSpec",
                              "--dllm-algorithm-config", BLOCK32[1])

    def info(server):
        data = requests.get(server.url + "/server_info", timeout=60).json()
        return {k: data[k] for k in ("dllm_algorithm", "dllm_algorithm_config", "max_running_requests",
                                     "disable_cuda_graph", "disable_overlap_schedule",
                                     "json_model_override_args", "page_size")}

    assert info(sglangs) == info(linearspec_server)
    assert info(sglangs)["max_running_requests"] == 16
    ours = generate_many(linearspec_server, prompts, 40)
    theirs = generate_many(sglangs, prompts, 40)
    assert [r["output_ids"] for r in theirs] == [r["output_ids"] for r in ours]
    for a, b in zip(theirs, ours):
        assert meta(a, "nemodiff_algorithm") == "linearspec"
        assert meta(a, "nemodiff_forwards") == meta(b, "nemodiff_forwards")
