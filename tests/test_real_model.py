"""SmolLM2-135M-Instruct converted to NLD form (sglang_nemodiff/bundled/smol.py): the conversion,
AR mode == transformers' own LlamaForCausalLM on the same weights (an independent oracle), and
LinearSpec == AR through the server, chat and plain prompts, greedy and (by distribution) sampled.
FastDiffuser serves it; its text is its own (agreement with AR is printed, not asserted)."""

import json
import os

import pytest
import requests
import torch

from conftest import generate, generate_many, meta
from distribution import ar_pair_distribution, pair_test

pytestmark = pytest.mark.slow

PLAIN = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, a little robot"]
CHAT = ["What is the capital of France?", "Give me three tips for better sleep.",
        "Write a Python function that reverses a string."]
NEW_TOKENS = 40
# LinearSpec servers of this model run fixed 8-token blocks: the oracle's block size in the
# forward-count test, and a quarter of a 32-token round's cost on this 135M model on CPU.
BLOCK8 = ("--algorithm-config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "block8.yaml"))


def linearspec(server_pool, path):
    return server_pool.get(path, "linearspec", *BLOCK8)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from sglang_nemodiff.bundled.smol import smol_model_path
    from sglang_nemodiff.tools.chat_prompts import chat_ids

    path = smol_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in PLAIN]
    prompts += [chat_ids(tokenizer, t) for t in CHAT]
    return path, tokenizer, prompts


@pytest.fixture(scope="module")
def transformers_greedy(smol):
    """transformers' greedy tokens (generate(), EOS kept) for every prompt."""
    from sglang_nemodiff.tools.convert import llama_from_nld

    path, tokenizer, prompts = smol
    model = llama_from_nld(path)
    eos = tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
            out.append(gen)
    return out


def test_conversion(smol):
    from sglang_nemodiff.checkpoint import check_checkpoint
    from sglang_nemodiff.tools.convert import pick_mask_token

    path, tokenizer, _ = smol
    check_checkpoint(path)
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert config["tie_word_embeddings"] and config["shift_logits"] and config["causal_seed"]
    mask = tokenizer.convert_ids_to_tokens(config["mask_token_id"])
    assert config["mask_token_id"] == pick_mask_token(tokenizer)
    assert mask not in tokenizer.chat_template and config["mask_token_id"] != config["eos_token_id"]
    assert "<|im_start|>" in tokenizer.chat_template  # the chat template came along
    assert os.path.isdir(os.path.join(path, "linear_spec_lora"))  # the shipped draft adapter


def test_ar_equals_transformers(server_pool, smol, transformers_greedy):
    path, _, prompts = smol
    server = server_pool.get(path, "ar")
    assert [r["output_ids"] for r in generate_many(server, prompts, NEW_TOKENS)] == transformers_greedy


def test_linearspec_equals_ar(server_pool, smol, transformers_greedy):
    """Six prompts at once (chat and plain): AR's tokens; the chat endpoint gives AR's text."""
    path, tokenizer, prompts = smol
    server = linearspec(server_pool, path)
    responses = generate_many(server, prompts, NEW_TOKENS)
    assert [r["output_ids"] for r in responses] == transformers_greedy
    accepted = [meta(r, "nemodiff_accept_length") for r in responses]
    print(f"smol linearspec B=8: accept length per block {accepted}")
    chat = {"model": "m", "messages": [{"role": "user", "content": CHAT[0]}], "max_tokens": 24,
            "temperature": 0}
    answers = [requests.post(s.url + "/v1/chat/completions", json=chat, timeout=300).json()
               ["choices"][0]["message"]["content"] for s in (server, server_pool.get(path, "ar"))]
    assert answers[0] == answers[1] and "Paris" in answers[0]


def test_linearspec_forwards_equal_oracle(server_pool, smol):
    """The served drafts are the oracle's (shifted convention, adapter on): same forwards."""
    from sglang_nemodiff.reference import NLDReference, linearspec_generate

    path, tokenizer, prompts = smol
    reference = NLDReference.from_pretrained(path)
    server = linearspec(server_pool, path)
    for ids in (prompts[3], prompts[4]):
        expected = linearspec_generate(reference, ids, 24, eos_id=tokenizer.eos_token_id, block_size=8)
        response = generate(server, ids, 24)
        assert response["output_ids"] == expected.tokens
        assert meta(response, "nemodiff_forwards") == expected.forwards


def test_linearspec_samples_ar_distribution(server_pool, smol):
    """300 samples of the first two answer tokens at T=0.7, top-p 0.9: inside AR's support and
    not rejected against AR's exact pair distribution; the same samples are rejected against the
    distribution at T=1.0 (negative control: the test has the power to fail)."""
    from sglang_nemodiff.reference import NLDReference
    from sglang_nemodiff.tools.chat_prompts import chat_ids

    path, tokenizer, _ = smol
    prompt = chat_ids(tokenizer, "Write a short poem about the sea.")
    reference = NLDReference.from_pretrained(path)
    server = linearspec(server_pool, path)
    response = requests.post(server.url + "/generate", timeout=900, json={
        "input_ids": [prompt] * 300,
        "sampling_params": {"max_new_tokens": 2, "ignore_eos": True, "temperature": 0.7, "top_p": 0.9}})
    response.raise_for_status()
    samples = [o["output_ids"] for o in response.json()]
    pvalue, outside = pair_test(ar_pair_distribution(reference, prompt, 0.7, 0.9), samples)
    wrong, _ = pair_test(ar_pair_distribution(reference, prompt, 1.0, 0.9), samples)
    print(f"smol linearspec T=0.7 top_p=0.9: p={pvalue:.3f}; against T=1.0: p={wrong:.2e}")
    assert outside == 0 and pvalue > 1e-3
    assert wrong < 1e-3


def test_fastdiffuser_serves_chat(server_pool, smol, transformers_greedy):
    import openai

    path, _, prompts = smol
    server = server_pool.get(path, "fastdiffuser")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    chat = client.chat.completions.create(model="m", max_tokens=32, temperature=0, messages=[
        {"role": "user", "content": CHAT[0]}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    responses = generate_many(server, prompts[3:], 24)  # the chat prompts; a 32-token block each
    same = sum(a == b for r, ar in zip(responses, transformers_greedy[3:])
               for a, b in zip(r["output_ids"], ar[:24]))
    total = sum(len(ar[:24]) for ar in transformers_greedy[3:])
    tpf = [meta(r, "nemodiff_tokens_per_forward") for r in responses]
    print(f"smol fastdiffuser: {same}/{total} tokens agree with AR position by position; "
          f"tokens per forward {tpf}")
    assert all(len(r["output_ids"]) > 0 for r in responses)
