"""FastDiffuser through the real SGLang runtime equals the reference FastDiffuser."""

import pytest

from conftest import generate, generate_many, meta
from sglang_nemodiff.reference import fastdiffuser_generate

pytestmark = pytest.mark.slow


def test_equals_reference_batch1_and_concurrent(fastdiffuser_server, reference, prompts):
    expected = [fastdiffuser_generate(reference, ids, 40, eos_id=11) for ids in prompts]
    sequential = [generate(fastdiffuser_server, ids, 40) for ids in prompts]
    assert [r["output_ids"] for r in sequential] == [e.tokens for e in expected]
    concurrent = generate_many(fastdiffuser_server, prompts, 40)
    assert [r["output_ids"] for r in concurrent] == [e.tokens for e in expected]
    for ref, response in zip(expected, concurrent):
        assert meta(response, "nemodiff_algorithm") == "fastdiffuser"
        assert meta(response, "nemodiff_forwards") == ref.forwards  # refresh passes included


def test_unsupported_feature_names_mode(fastdiffuser_server):
    import requests

    response = requests.post(fastdiffuser_server.url + "/generate", timeout=60, json={
        "text": "hi", "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    assert response.status_code == 400
    assert "fastdiffuser" in response.text and "logprobs" in response.text


def test_frontend_gen(fastdiffuser_server):
    import sglang as sgl

    @sgl.function
    def program(s):
        s += "The quick brown fox"
        s += sgl.gen("rest", max_tokens=20, temperature=0)

    state = program.run(backend=sgl.RuntimeEndpoint(fastdiffuser_server.url))
    assert isinstance(state["rest"], str) and len(state["rest"]) > 0
