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


@pytest.mark.parametrize("params, feature", [
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_new_tokens": 4}, "min_new_tokens"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_unsupported_features_get_400_naming_mode(fastdiffuser_server, params, feature):
    """Penalties have no defined meaning for parallel denoising: 400 naming feature and mode."""
    import requests

    response = requests.post(fastdiffuser_server.url + "/generate", timeout=60, json={
        "text": "hi", "sampling_params": {"temperature": 0, "max_new_tokens": 4, **params}})
    assert response.status_code == 400, response.text
    assert "fastdiffuser" in response.text and feature in response.text


def test_frontend_gen_equals_reference(fastdiffuser_server, tokenizer, reference):
    import sglang as sgl

    from sglang_nemodiff.reference import fastdiffuser_generate

    @sgl.function
    def program(s):
        s += "The quick brown fox"
        s += sgl.gen("rest", max_tokens=20, temperature=0)

    state = program.run(backend=sgl.RuntimeEndpoint(fastdiffuser_server.url))
    ids = tokenizer("The quick brown fox").input_ids
    expected = fastdiffuser_generate(reference, ids, 20, eos_id=11).tokens
    assert state["rest"] == tokenizer.decode(expected, skip_special_tokens=True)
