"""Quadratic self-speculation through the real SGLang runtime, on the bundled model (its quadratic
draft adapter, `quadratic_lora/`, makes drafts that are accepted): identical to AR at temperature 0, one forward per round
and the oracle's forwards, concurrent batches of mixed prompts, stop strings / EOS /
max_new_tokens that are not multiples of b, AR's distribution when sampling (with a negative
control), aborts that free their KV (the strict idle check is on), 400 for grammars."""

import time

import pytest
import requests

from conftest import abort_mid_generation, generate, generate_many, meta, openai_defaults_answer
from distribution import triple_cells, triple_pvalue
from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.reference import NLDReference, ar_generate, quadratic_generate

pytestmark = pytest.mark.slow
MAX_NEW = 45  # not a multiple of b = 16
EOS = 11


@pytest.fixture(scope="module")
def model():
    from transformers import AutoTokenizer

    from sglang_nemodiff.tools.training import heldout_prompt_sets

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sets = heldout_prompt_sets(tokenizer, n_per_set=3, continuation_tokens=96)
    prompts = [p.input_ids for p in sets["continuation"] + sets["edit"]]
    prompts += [tokenizer("def add(a, b):", add_special_tokens=False).input_ids]  # short
    # the adapter the quadratic server runs: the checkpoint's quadratic_lora (checkpoint.adapter_dir)
    return path, NLDReference.from_pretrained(path, quadratic=True), tokenizer, prompts


@pytest.fixture
def quadratic(server_pool, model):
    return server_pool.get(model[0], "quadratic")


def test_equals_ar_and_the_oracles_forwards(quadratic, model):
    """== AR token for token, one by one and 7 at once; == the oracle forward for forward."""
    path, reference, _, prompts = model
    expected = [ar_generate(reference, ids, MAX_NEW, eos_id=EOS).tokens for ids in prompts]
    sequential = [generate(quadratic, ids, MAX_NEW) for ids in prompts]
    assert [r["output_ids"] for r in sequential] == expected
    assert [r["output_ids"] for r in generate_many(quadratic, prompts, MAX_NEW)] == expected
    for ids, response in zip(prompts, sequential):
        oracle = quadratic_generate(reference, ids, MAX_NEW, eos_id=EOS, block_size=16)
        assert meta(response, "nemodiff_algorithm") == "quadratic"
        assert meta(response, "nemodiff_forwards") == oracle.forwards == 1 + meta(response, "nemodiff_blocks")
        assert meta(response, "nemodiff_forwards_per_pass") == {"prefill": 1, "quadratic": oracle.forwards - 1}
    # The server drafts with the quadratic adapter: the LinearSpec adapter's oracle differs.
    linearspec_adapter = NLDReference.from_pretrained(path)
    assert [meta(r, "nemodiff_forwards") for r in sequential] != [
        quadratic_generate(linearspec_adapter, ids, MAX_NEW, eos_id=EOS, block_size=16).forwards
        for ids in prompts]
    accepted = [meta(r, "nemodiff_accept_length") for r in sequential]
    print("bundled quadratic b=16: tokens/forward", [meta(r, "nemodiff_tokens_per_forward") for r in sequential])
    assert max(accepted) > 1.5  # drafts are accepted: the test exercises acceptance, not only bonuses


def test_stop_strings_eos_and_lengths_like_ar(quadratic, model):
    path, reference, tokenizer, prompts = model
    ids = prompts[1]
    ar = ar_generate(reference, ids, 40, eos_id=EOS).tokens
    text = tokenizer.decode(ar)
    stop = text[10:14]
    assert stop.strip()
    for params in ({"stop": [stop]}, {"max_new_tokens": 7}, {"max_new_tokens": 33},
                   {"stop_token_ids": [ar[9]]}):
        params = {"max_new_tokens": 40, **params}
        n = params.pop("max_new_tokens")
        out = generate(quadratic, ids, n, **params)
        if "stop" in params:
            assert stop not in out["text"] and text.startswith(out["text"])
            assert out["meta_info"]["finish_reason"]["type"] == "stop"
        elif "stop_token_ids" in params:
            assert out["output_ids"] == ar[:ar.index(ar[9]) + 1]
        else:
            assert out["output_ids"] == ar[:n]
            assert out["meta_info"]["finish_reason"]["type"] == ("stop" if EOS in ar[:n] else "length")


def test_samples_ar_distribution_with_negative_control(quadratic, model):
    """300 samples of the first three tokens at temperature 0.7 / top-p 0.9 against AR's exact
    probabilities; the same samples against AR at temperature 0.4 are rejected (the test bites)."""
    _, reference, tokenizer, _ = model
    prompt = tokenizer("    def __init__(self, path):\n        self.", add_special_tokens=False).input_ids
    response = requests.post(quadratic.url + "/generate", timeout=600, json={
        "input_ids": [prompt] * 300,
        "sampling_params": {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0.7, "top_p": 0.9}})
    response.raise_for_status()
    outputs = [o["output_ids"] for o in response.json()]
    accepted = sum(meta(o, "nemodiff_accept_length") > 1 for o in response.json())
    pvalue, outside = triple_pvalue(triple_cells(reference, prompt, 0.7, 0.9), outputs)
    wrong, _ = triple_pvalue(triple_cells(reference, prompt, 0.4, 0.9), outputs)
    print(f"quadratic T=0.7 top_p=0.9: p={pvalue:.3f} (negative control p={wrong:.2e}), "
          f"{accepted}/300 took a draft")
    assert outside == 0 and pvalue > 1e-3
    assert wrong < 1e-3  # the same rule rejects AR at another temperature
    assert accepted > 5  # drafts are accepted at T > 0 too (~22 of 300 here)


def test_openai_defaults_get_an_answer(quadratic):
    openai_defaults_answer(quadratic)


def test_seeds_reproduce(quadratic, model):
    prompt = model[3][0]
    one = generate(quadratic, prompt, 24, temperature=0.8, sampling_seed=7)["output_ids"]
    assert generate(quadratic, prompt, 24, temperature=0.8, sampling_seed=7)["output_ids"] == one


def test_grammar_is_a_400_naming_it(quadratic, model):
    response = requests.post(quadratic.url + "/generate", timeout=60, json={
        "input_ids": model[3][0], "sampling_params": {"max_new_tokens": 8, "regex": "[a-z]+"}})
    assert response.status_code == 400 and "quadratic" in response.text and "regex" in response.text


def test_aborted_requests_free_their_kv(quadratic, model):
    """30 requests aborted mid-generation; the strict idle KV check would kill a leaking server."""
    url, prompts = quadratic.url, model[3]
    finished = abort_mid_generation(quadratic, prompts, 30, 300, "qabort")
    assert finished.count("abort") >= 20, finished
    time.sleep(3)  # idle: SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE checks the pool here
    assert requests.get(url + "/health_generate", timeout=60).status_code == 200
    assert len(generate(quadratic, prompts[0], 8)["output_ids"]) == 8


def test_random_drafts_still_ar_at_concurrency_16(server_pool, tiny_checkpoint, reference, prompts):
    """A random checkpoint's drafts are garbage: the output must still be AR's, 16 requests at
    once, with the oracle's forwards (one per round)."""
    server = server_pool.get(tiny_checkpoint, "quadratic")
    batch = (list(prompts) * 2)[:16]
    expected = [ar_generate(reference, ids, 24, eos_id=EOS).tokens for ids in batch]
    responses = generate_many(server, batch, 24)
    assert [r["output_ids"] for r in responses] == expected
    forwards = [quadratic_generate(reference, ids, 24, eos_id=EOS).forwards for ids in prompts]
    assert [meta(r, "nemodiff_forwards") for r in responses[:len(prompts)]] == forwards


def test_sparse_quadratic_equals_ar_and_the_oracle(server_pool, model):
    """`quadratic_groups: 2`: groups after d_0 and d_1 only (16 + 2 x 16 query tokens per
    request instead of 272): == AR, the oracle's forwards (rounds after an acceptance past the
    groups run without drafts). This server runs graph-safe passes (`cuda_graphs: true`: the
    round's shape and kind are data the nemodiff backend and the adapter rows read)."""
    import os

    path, reference, _, prompts = model
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quadratic_sparse.yaml")
    server = server_pool.get(path, "quadratic", "--algorithm-config", config,
                             "--attention-backend", "nemodiff")  # graph-safe passes (the YAML)
    from sglang_nemodiff.model import GRAPH_SAFE_LOG_LINE

    with open(server.log_path) as f:
        assert GRAPH_SAFE_LOG_LINE in f.read()
    responses = generate_many(server, prompts, MAX_NEW)
    assert [r["output_ids"] for r in responses] == \
        [ar_generate(reference, ids, MAX_NEW, eos_id=EOS).tokens for ids in prompts]
    oracle = [quadratic_generate(reference, ids, MAX_NEW, eos_id=EOS, block_size=16, groups=2)
              for ids in prompts]
    assert [meta(r, "nemodiff_forwards") for r in responses] == [o.forwards for o in oracle]
    dense = [quadratic_generate(reference, ids, MAX_NEW, eos_id=EOS, block_size=16).forwards
             for ids in prompts]
    print("sparse (2 groups) vs dense forwards:", [o.forwards for o in oracle], dense)


def test_auto_changes_the_round_shape_and_equals_ar(server_pool, model, tmp_path_factory):
    """`block_size: auto`: the policy runs each batch as AR steps, a LinearSpec round or a
    quadratic round of its choice of (b, groups) (quadratic_policy.py). A fresh server's
    start-up sweep runs every shape it times, and then the policy's choices follow: the output
    stays AR's through every change of shape, one request and 8 at once."""
    path, reference, _, prompts = model
    config = tmp_path_factory.mktemp("quadratic-auto") / "auto.yaml"
    config.write_text("block_size: auto\n")
    server = server_pool.get(path, "quadratic", "--algorithm-config", str(config))
    expected = [ar_generate(reference, ids, MAX_NEW, eos_id=EOS).tokens for ids in prompts]
    responses = [generate(server, ids, MAX_NEW) for ids in prompts[:3]]
    responses += generate_many(server, prompts + prompts[:1], MAX_NEW)
    assert [r["output_ids"] for r in responses] == expected[:3] + expected + expected[:1]
    sizes, groups, passes = {}, {}, {}
    for r in responses:
        for table, key in ((sizes, "nemodiff_blocks_per_size"), (groups, "nemodiff_quadratic_groups"),
                           (passes, "nemodiff_forwards_per_pass")):
            for k, n in (meta(r, key) or {}).items():
                table[k] = table.get(k, 0) + n
    print(f"quadratic auto: blocks per size {sizes}, quadratic rounds per groups {groups}, "
          f"forwards per pass {passes}")
    assert len(sizes) >= 3 and len(groups) >= 3  # shapes changed between rounds
    assert {"ar_step", "draft", "verify", "quadratic"} <= set(passes)  # every kind of round ran
    with open(server.log_path) as f:
        log = f.read()
    assert "(sweep)" in log and "expected tok/s by candidate" in log
    time.sleep(3)  # idle: the strict KV check runs
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200
