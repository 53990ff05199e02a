"""LinearSpec serves what AR serves, equal to AR: constrained decoding (regex, JSON schema) and
logprobs (output, top-k, chosen ids, prompt scoring), through real servers."""

import json
import re

import pytest
import requests

from conftest import generate

pytestmark = pytest.mark.slow

IP = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                      "age": {"type": "integer"}},
                     "required": ["name", "age"]})


@pytest.mark.parametrize("constraint", [{"regex": IP}, {"json_schema": SCHEMA}], ids=["regex", "json"])
def test_constrained_decoding_equals_ar(linearspec_server, ar_server, prompts, constraint):
    for ids in prompts[:3]:
        ar = generate(ar_server, ids, 48, **constraint)
        spec = generate(linearspec_server, ids, 48, **constraint)
        assert spec["output_ids"] == ar["output_ids"] and spec["text"] == ar["text"]
    if "regex" in constraint:
        assert re.fullmatch(IP, ar["text"])
        # Sampled: every output still satisfies the grammar.
        for seed in range(3):
            text = generate(linearspec_server, prompts[0], 48, temperature=1.0, sampling_seed=seed,
                            **constraint)["text"]
            assert re.fullmatch(IP, text), text


def _logprobs(server, ids, **extra):
    return requests.post(server.url + "/generate", timeout=120, json={
        "input_ids": ids, "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0,
        "token_ids_logprob": [5, 200], "sampling_params": {"temperature": 0, "max_new_tokens": 24,
                                                           **extra}}).json()["meta_info"]


@pytest.mark.parametrize("mode", ["linearspec", "fastdiffuser", "quadratic"])
def test_logprobs_and_scoring(server_pool, tiny_checkpoint, ar_server, prompts, mode):
    """LinearSpec's and quadratic's tokens are causal-pass tokens: their logprobs (and the
    prompt's) equal AR mode's. FastDiffuser reports each token's logprob under the pass that
    committed it."""
    server = server_pool.get(tiny_checkpoint, mode)
    ar, got = _logprobs(ar_server, prompts[1]), _logprobs(server, prompts[1])
    assert len(got["output_token_logprobs"]) == got["completion_tokens"] == 24
    assert [x[1] for x in got["input_token_logprobs"]] == [x[1] for x in ar["input_token_logprobs"]]
    assert got["input_token_logprobs"][1][0] == pytest.approx(ar["input_token_logprobs"][1][0], abs=1e-4)
    if mode in ("linearspec", "quadratic"):
        for key in ("output_token_logprobs", "input_token_logprobs"):
            for a, b in zip(ar[key], got[key]):
                assert a[1] == b[1] and (a[0] is None or a[0] == pytest.approx(b[0], abs=1e-4))
        for a, b in zip(ar["output_top_logprobs"], got["output_top_logprobs"]):
            assert [t[1] for t in a] == [t[1] for t in b]
            assert [t[0] for t in a] == pytest.approx([t[0] for t in b], abs=1e-4)
        for a, b in zip(ar["output_token_ids_logprobs"], got["output_token_ids_logprobs"]):
            assert [t[1] for t in a] == [t[1] for t in b] == [5, 200]
            assert [t[0] for t in a] == pytest.approx([t[0] for t in b], abs=1e-4)
    else:
        assert all(v[0] <= 0 for v in got["output_token_logprobs"])
        assert all(len(step) == 3 for step in got["output_top_logprobs"])
    # Prompt scoring: max_new_tokens=0 returns the prompt's logprobs and no token.
    scored = _logprobs(server, prompts[1], max_new_tokens=0)
    assert scored["completion_tokens"] == 0
    assert [x[0] for x in scored["input_token_logprobs"][1:]] == pytest.approx(
        [x[0] for x in ar["input_token_logprobs"][1:]], abs=1e-4)


def test_fastdiffuser_constrained_output_is_valid(server_pool, tiny_checkpoint, prompts):
    """FastDiffuser commits a grammar request left to right under the matcher's mask: every
    output (greedy and sampled) satisfies the regex and ends at its end."""
    server = server_pool.get(tiny_checkpoint, "fastdiffuser")
    for i, ids in enumerate(prompts[:3]):
        greedy = generate(server, ids, 48, regex=IP)
        assert re.fullmatch(IP, greedy["text"]), greedy["text"]
        sampled = generate(server, ids, 48, regex=IP, temperature=1.0, sampling_seed=i)
        assert re.fullmatch(IP, sampled["text"]), sampled["text"]
    # JSON shape by regex (a JSON schema allows free whitespace, which a random model spends its
    # tokens on): the output parses.
    doc = generate(server, prompts[0], 64, regex=r'\{"name": "[a-z]{1,8}", "age": [0-9]{1,3}\}')["text"]
    assert set(json.loads(doc)) == {"name", "age"}, doc


@pytest.mark.parametrize("mode", ["linearspec", "fastdiffuser", "quadratic"])
def test_parallel_sampling_n(server_pool, tiny_checkpoint, mode):
    """n > 1: n sampled outputs per prompt, as AR mode returns them."""
    server = server_pool.get(tiny_checkpoint, mode)
    out = requests.post(server.url + "/generate", timeout=120, json={
        "text": "def add(a, b):", "sampling_params": {"temperature": 1.0, "max_new_tokens": 12, "n": 3}}).json()
    assert len(out) == 3 and all(len(o["output_ids"]) > 0 for o in out)
    assert len({tuple(o["output_ids"]) for o in out}) > 1
