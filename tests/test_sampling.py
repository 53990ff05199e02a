"""Sampling in the diffusion modes through real servers: LinearSpec at temperature > 0 draws from
AR's distribution (checked against the oracle's exact probabilities, filtered by SGLang's own
AR sampler code), seeds make requests reproducible, greedy requests stay AR's tokens, and an
ordinary client that sends no temperature gets an answer in every mode."""

import pytest
import requests

from conftest import generate, openai_defaults_answer
from distribution import ar_pair_distribution, pair_test
from sglang_nemodiff.bundled import bundled_model_path

pytestmark = pytest.mark.slow
PROMPT_TEXT = "    def __init__(self, path):\n        self."


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoTokenizer

    from sglang_nemodiff.reference import NLDReference

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, NLDReference.from_pretrained(path), tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids


def sample_many(server, prompt, n, **params):
    """n samples of the first two tokens, in one batched /generate call."""
    response = requests.post(server.url + "/generate", timeout=600, json={
        "input_ids": [prompt] * n,
        "sampling_params": {"max_new_tokens": 2, "ignore_eos": True, **params}})
    response.raise_for_status()
    return response.json()


def test_linearspec_samples_ar_distribution(server_pool, bundled):
    """600 samples of (t1, t2) at temperature 0.7 / top-p 0.9: no pair outside AR's support,
    and a chi-square test against AR's exact pair probabilities does not reject. (The decision
    rule itself, and two wrong rules it rejects, are tested at high power in
    test_speculative_sampling.py.)"""
    path, reference, prompt = bundled
    pairs = ar_pair_distribution(reference, prompt, temperature=0.7, top_p=0.9)
    out = sample_many(server_pool.get(path, "linearspec"), prompt, 600, temperature=0.7, top_p=0.9)
    pvalue, outside = pair_test(pairs, [o["output_ids"] for o in out])
    accept = [o["meta_info"]["nemodiff_accept_length"][-1] for o in out]
    print(f"linearspec T=0.7 top_p=0.9: p={pvalue:.3f}, mean accept length {sum(accept) / len(accept):.2f}")
    assert outside == 0 and pvalue > 1e-3


def test_seeds_reproduce_and_greedy_stays_ar(server_pool, bundled):
    path, reference, prompt = bundled
    from sglang_nemodiff.reference import ar_generate

    greedy = ar_generate(reference, prompt, 24, eos_id=11).tokens
    for mode in ("linearspec", "fastdiffuser"):
        server = server_pool.get(path, mode)
        one = generate(server, prompt, 24, temperature=0.8, sampling_seed=123)["output_ids"]
        assert generate(server, prompt, 24, temperature=0.8, sampling_seed=123)["output_ids"] == one
        others = {tuple(generate(server, prompt, 24, temperature=0.8, sampling_seed=s)["output_ids"])
                  for s in range(4)}
        assert len(others) > 1, mode
    # top_k=1 at any temperature is greedy: LinearSpec returns AR's tokens.
    spec = server_pool.get(path, "linearspec")
    assert generate(spec, prompt, 24, temperature=0.9, top_k=1)["output_ids"] == greedy


@pytest.mark.parametrize("mode", ["ar", "linearspec", "fastdiffuser"])
def test_openai_defaults_get_an_answer(server_pool, mode):
    """OpenAI clients send no temperature (default 1.0): every mode answers (quadratic:
    test_serve_quadratic.py, on its server)."""
    openai_defaults_answer(server_pool.get(bundled_model_path(), mode))
