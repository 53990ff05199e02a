"""LinearSpec's B = 1 rounds taken as AR steps (algorithms/ar_steps.py): each step's penalties
count the round's earlier tokens (unit), and through a real server every round of `ar_steps`
steps equals AR token for token at T = 0 (batch sizes 1-32, mixed prompt and output lengths, so
rows leave the loop at different steps; strict idle KV check on), and at T > 0 the first and
second step of a round draw from AR's distribution, with a negative control that the same test
rejects the distribution of the step before."""

import random
import time
from collections import Counter

import pytest
import requests
import torch

from conftest import generate_many, meta
from sglang_nemodiff.algorithms.ar_steps import row_budgets
from sglang_nemodiff.algorithms.sampling import Penalties
from sglang_nemodiff.block_policy import WARM_TIMINGS, BlockSizePolicy, RoundBlockSize
from sglang_nemodiff.settings import BLOCK_SIZES, AlgorithmSettings

VOCAB, EOS = 2048, 11  # the bundled model's
AR_STEPS = "block_size: auto\nblock_size_cycle: [1]\nar_steps: 8\n"


def _penalties(bs, V, gen):
    return Penalties(frequency=torch.full((bs, 1), 0.3), presence=torch.full((bs, 1), 0.2),
                     repetition=torch.full((bs, 1), 1.3), counts=torch.randint(0, 2, (bs, V), generator=gen).float(),
                     n_out=torch.tensor([0, 3]), min_new=torch.tensor([4, 0]),
                     stop_tokens=torch.zeros(bs, V, dtype=torch.bool).index_fill_(1, torch.tensor([5]), True),
                     bias=None)


def test_a_step_inside_the_round_is_penalised_like_that_slot_of_a_block():
    gen = torch.Generator().manual_seed(0)
    bs, V, B = 2, 12, 5
    penalties = _penalties(bs, V, gen)
    logits = torch.randn(bs, B, V, generator=gen)
    block = torch.randint(0, V, (bs, B), generator=gen)
    whole = penalties.apply(logits, block)
    for j in range(B):
        step = penalties.apply(logits[:, j : j + 1], block if j else None, start=j)
        assert torch.allclose(step[:, 0], whole[:, j]), j
    # The control: ignoring the round's earlier tokens gives other logits at a later step.
    assert not torch.allclose(penalties.apply(logits[:, 3:4])[:, 0], whole[:, 3])


def test_row_budgets_stop_at_max_new_tokens():
    class Req:
        def __init__(self, max_new, out):
            self.sampling_params = type("SP", (), {"max_new_tokens": max_new})()
            self.output_ids = [0] * out

    assert row_budgets([Req(40, 1), Req(40, 37), Req(40, 39)], 3, 8) == [8, 3, 1]
    assert row_budgets(None, 2, 8) == [8, 8]


def test_policy_counts_a_b1_round_as_its_ar_steps():
    """A B = 1 round of k steps commits k tokens for k forwards plus one round's overhead: with
    a per-round overhead as large as a forward, k = 8 amortises it and B = 1 is rated 1.8x the
    one-step round; the slots a round places follow (LinearSpec only, at most the max block)."""
    def rate(ar_steps):
        p = BlockSizePolicy(32, BLOCK_SIZES, ar_steps)
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            for _ in range(WARM_TIMINGS):
                p.observe_forward(n, 1e-3 * n)
        for _ in range(WARM_TIMINGS):
            p.overhead.observe(8, 8e-3)  # one forward of the batch of 8
        p.rounds = 1
        return p.choose(8).block_size, dict(p.rates(8))[1]

    (b1, one), (b8, eight) = rate(1), rate(8)
    assert b1 == b8 == 1
    assert eight / one == pytest.approx((8e-3 + 8e-3) / (8e-3 + 8e-3 / 8))
    settings = AlgorithmSettings(ar_steps=8)
    assert RoundBlockSize(settings, 32, "linearspec").slots(1) == 8
    assert RoundBlockSize(settings, 4, "linearspec").slots(1) == 4
    assert RoundBlockSize(settings, 32, "fastdiffuser").slots(1) == 1
    assert RoundBlockSize(settings, 32, "linearspec").slots(16) == 16
    for bad in (0, -1, "8", True):
        with pytest.raises(ValueError, match="ar_steps"):
            AlgorithmSettings.from_mapping({"ar_steps": bad})


@pytest.fixture(scope="module")
def ar_steps_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("ar-steps") / "ar_steps.yaml"
    path.write_text(AR_STEPS)
    return str(path)


@pytest.fixture(scope="module")
def bundled():
    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.reference import NLDReference

    path = bundled_model_path()
    return path, NLDReference.from_pretrained(path)


@pytest.mark.slow
def test_ar_step_rounds_equal_ar(server_pool, bundled, ar_steps_config):
    from concurrent.futures import ThreadPoolExecutor

    from sglang_nemodiff.reference import ar_generate

    path, reference = bundled
    server = server_pool.get(path, "linearspec", "--algorithm-config", ar_steps_config)
    rng = random.Random(7)
    for batch in (1, 8, 32):
        prompts = [[rng.randrange(200, VOCAB) for _ in range(rng.randint(1, 120))] for _ in range(batch)]
        lengths = [rng.choice((5, 13, 29, 40)) for _ in prompts]  # rows leave at different steps
        with ThreadPoolExecutor(batch) as pool:
            responses = list(pool.map(lambda a: generate_many(server, [a[0]], a[1])[0], zip(prompts, lengths)))
        for ids, new, response in zip(prompts, lengths, responses):
            expected = ar_generate(reference, ids, new, eos_id=EOS).tokens
            assert response["output_ids"] == expected
            # Every token after the first is one AR step: counted as a block of size 1.
            assert meta(response, "nemodiff_blocks_per_size") == {"1": len(expected) - 1}
            assert meta(response, "nemodiff_forwards") == len(expected)
    time.sleep(3)  # idle: the strict KV check runs
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200


@pytest.mark.slow
def test_ar_steps_sample_ar_distribution(server_pool, bundled, ar_steps_config):
    """Tokens 2 and 3 come from steps 0 and 1 of one AR-steps round: (t1, t2) against AR's
    exact pair distribution, and t3 after the most frequent (t1, t2) against AR's distribution
    there. Negative control: that t3 sample is rejected against AR's distribution one step
    earlier (what a step attending to the wrong prefix would draw from)."""
    from distribution import ar_pair_distribution, ar_step_probs, chi_square_pvalue, pair_test
    from test_sampling import PROMPT_TEXT, sample_many
    from transformers import AutoTokenizer

    path, reference = bundled
    prompt = AutoTokenizer.from_pretrained(path)(PROMPT_TEXT, add_special_tokens=False).input_ids
    server = server_pool.get(path, "linearspec", "--algorithm-config", ar_steps_config)
    out = sample_many(server, prompt, 600, temperature=0.7, top_p=0.9, max_new_tokens=3)
    outputs = [o["output_ids"] for o in out]
    pvalue, outside = pair_test(ar_pair_distribution(reference, prompt, temperature=0.7, top_p=0.9), outputs)
    (t1, t2), count = Counter(tuple(ids[:2]) for ids in outputs).most_common(1)[0]
    third = torch.tensor([ids[2] for ids in outputs if tuple(ids[:2]) == (t1, t2)])
    right = chi_square_pvalue(third, ar_step_probs(reference, prompt + [t1, t2], 0.7, 0.9))
    wrong = chi_square_pvalue(third, ar_step_probs(reference, prompt + [t1], 0.7, 0.9))
    print(f"ar steps T=0.7: pair p={pvalue:.3f}; t3 after {(t1, t2)} ({count} samples) p={right:.3f}, "
          f"against the step before p={wrong:.2e}")
    assert all(meta(o, "nemodiff_blocks_per_size") == {"1": 2} for o in out)
    assert outside == 0 and pvalue > 1e-3 and right > 1e-3
    assert wrong < 1e-6


def test_arrivals_probe_sees_a_request_without_receiving_it():
    """The probe a round of AR steps asks after each step (patches/dllm_arrivals.py), on a real
    zmq PULL socket like the scheduler's: a message waiting is seen and left there; nothing is
    seen while requests already wait for room in the scheduler's queue."""
    from types import SimpleNamespace

    import zmq

    from sglang_nemodiff.patches.dllm_arrivals import Arrivals

    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        scheduler = SimpleNamespace(waiting_queue=[])
        probe = Arrivals(scheduler, pull)
        assert not probe()
        push.send_pyobj("request")
        deadline = time.monotonic() + 10
        while not probe() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert probe() and probe()  # seen, not consumed
        scheduler.waiting_queue.append("queued")
        assert not probe()
        scheduler.waiting_queue.clear()
        assert pull.recv_pyobj(zmq.NOBLOCK) == "request"
        assert not probe()
    finally:
        pull.close(0)
        push.close(0)
        context.term()


def _streamed_lengths(server, ids, max_new_tokens):
    """Output lengths after each streamed chunk of a greedy /generate (one chunk per round)."""
    import json

    lengths, last = [], None
    with requests.post(server.url + "/generate", stream=True, timeout=300, json={
            "input_ids": ids, "stream": True, "sampling_params": {
                "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}) as response:
        for line in response.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                last = json.loads(line[5:])
                lengths.append(len(last["output_ids"]))
    return lengths, last


@pytest.mark.slow
def test_a_request_arriving_mid_round_cuts_the_round(server_pool, bundled, ar_steps_config):
    """Rounds of 8 AR steps: a request streamed alone gets its tokens 1 + 8k at a time (the
    prefill's token, then whole rounds: the control, which shows the check can fail); requests
    sent while it streams end its round after the step that saw them (patches/
    dllm_arrivals.py), so some chunk ends off that grid, and every answer still equals AR."""
    from concurrent.futures import ThreadPoolExecutor

    from sglang_nemodiff.reference import ar_generate

    path, reference = bundled
    server = server_pool.get(path, "linearspec", "--algorithm-config", ar_steps_config)
    rng = random.Random(11)
    long_prompt = [rng.randrange(200, VOCAB) for _ in range(40)]
    new = 400
    alone, _ = _streamed_lengths(server, long_prompt, new)
    assert all((n - 1) % 8 == 0 for n in alone[:-1]), alone
    short_prompts = [[rng.randrange(200, VOCAB) for _ in range(20)] for _ in range(6)]
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_streamed_lengths, server, long_prompt, new)
        short = []
        for ids in short_prompts:
            time.sleep(0.1)
            short.append(generate_many(server, [ids], 4)[0])
        lengths, last = streamed.result()
    print(f"chunks alone: {alone[:8]}...; with arrivals: {lengths}")
    assert any((n - 1) % 8 for n in lengths[:-1]), lengths
    assert last["output_ids"] == ar_generate(reference, long_prompt, new, eos_id=None).tokens
    for ids, response in zip(short_prompts, short):
        assert response["output_ids"] == ar_generate(reference, ids, 4, eos_id=EOS).tokens
