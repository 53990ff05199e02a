"""LinearSpec with a block size that changes between rounds, through real servers: a scripted
cycle through every B in {1, 2, 4, 8, 16, 32} (so every size and every switch runs) and the
default `block_size: auto` policy. At temperature 0 both equal AR token for token at batch sizes
1-32 with mixed prompt lengths, constrained and logprob requests included; the strict idle KV
check (on for every test server) stays quiet."""

import random
import time

import pytest
import requests

from conftest import generate, generate_many, meta
from sglang_nemodiff.reference import ar_generate

pytestmark = pytest.mark.slow
VOCAB, EOS = 384, 11
CYCLE = "block_size: auto\nblock_size_cycle: [32, 1, 2, 16, 4, 8, 1, 32]\n"


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("block-configs")
    (root / "cycle.yaml").write_text(CYCLE)
    (root / "auto.yaml").write_text("block_size: auto\n")
    return {name: str(root / f"{name}.yaml") for name in ("cycle", "auto")}


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(130, VOCAB) for _ in range(rng.randint(1, 120))] for _ in range(n)]


@pytest.mark.parametrize("policy", ["cycle", "auto"])
def test_changing_block_size_equals_ar(server_pool, tiny_checkpoint, reference, configs, policy):
    server = server_pool.get(tiny_checkpoint, "linearspec", "--algorithm-config", configs[policy])
    sizes = {}
    for batch, new in ((1, 64), (8, 48), (32, 40)):
        prompts = _prompts(batch, seed=batch)
        for ids, response in zip(prompts, generate_many(server, prompts, new)):
            assert response["output_ids"] == ar_generate(reference, ids, new, eos_id=EOS).tokens
            for b, n in meta(response, "nemodiff_blocks_per_size").items():
                sizes[int(b)] = sizes.get(int(b), 0) + n
    print(f"{policy}: blocks per size {dict(sorted(sizes.items()))}")
    if policy == "cycle":
        assert set(sizes) == {1, 2, 4, 8, 16, 32}
    else:  # the start-up sweep times every size, then the policy decides
        assert set(sizes) >= {1, 32}
        log = open(server.log_path, errors="replace").read()
        assert "(sweep)" in log and "expected tok/s by candidate" in log
    time.sleep(3)  # idle: the strict KV check runs
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200


def test_cycle_serves_grammar_logprobs_and_sampling(server_pool, tiny_checkpoint, ar_server, configs, prompts):
    """The B = 1 rounds (no draft pass) and every other size keep the features: a regex output
    and logprobs equal AR's, sampled requests complete."""
    server = server_pool.get(tiny_checkpoint, "linearspec", "--algorithm-config", configs["cycle"])
    regex = r"[a-z]{3,12}( [a-z]{2,8}){2,6}\."
    for ids in prompts[:2]:
        assert generate(server, ids, 40, regex=regex)["output_ids"] == generate(ar_server, ids, 40, regex=regex)["output_ids"]
    body = {"input_ids": prompts[1], "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 20}}
    got = requests.post(server.url + "/generate", json=body, timeout=120).json()["meta_info"]
    ar = requests.post(ar_server.url + "/generate", json=body, timeout=120).json()["meta_info"]
    assert [t[1] for t in got["output_token_logprobs"]] == [t[1] for t in ar["output_token_logprobs"]]
    assert [t[0] for t in got["output_token_logprobs"]] == pytest.approx([t[0] for t in ar["output_token_logprobs"]], abs=1e-4)
    sampled = generate_many(server, prompts[:6], 32, temperature=0.8, top_p=0.9)
    assert all(r["meta_info"]["finish_reason"]["type"] in ("length", "stop") for r in sampled)
