"""The shifted draft convention of converted AR models (`shift_logits: true`): in a bidirectional
pass the output at slot j predicts slot j + 1. The model classes turn it into per-slot logits, so
LinearSpec and FastDiffuser (and sampling, grammar and the kernels, which read per-slot logits)
honour it without knowing it. A tiny random checkpoint in the converted layout (tied head, plain
RoPE, shifted drafts) is served == the oracle, token for token and forward for forward."""

import os

import pytest
import torch

from conftest import generate, generate_many, meta
from sglang_nemodiff.reference import (
    NLDReference,
    ar_generate,
    fastdiffuser_generate,
    linearspec_generate,
    quadratic_generate,
)
from sglang_nemodiff.reference.model import slot_logits

CONVERTED_LAYOUT = dict(shift_logits=True, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def shifted_checkpoint(tmp_path_factory):
    from sglang_nemodiff.checkpoint import write_random_checkpoint

    return write_random_checkpoint(str(tmp_path_factory.mktemp("shifted") / "tiny-shifted"), seed=3,
                                   lora_rank=8, **CONVERTED_LAYOUT)


@pytest.fixture(scope="module")
def shifted_reference(shifted_checkpoint):
    return NLDReference.from_pretrained(shifted_checkpoint)


def test_slot_logits_moves_rows_by_one():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(slot_logits(logits, False), logits)
    shifted = slot_logits(logits, True)
    assert torch.equal(shifted[:, 1:], logits[:, :-1]) and torch.equal(shifted[:, 0], logits[:, 0])


def test_converted_layout_loads_tied_and_plain(shifted_checkpoint, shifted_reference):
    from safetensors import safe_open

    with safe_open(os.path.join(shifted_checkpoint, "model.safetensors"), "pt") as f:
        assert "diffusion_head.weight" not in f.keys()  # tied: the head is the embedding
    ref = shifted_reference
    assert ref.diffusion_head.weight.data_ptr() == ref.embed_tokens.weight.data_ptr()
    assert ref.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert ref.rope_scale == 1.0  # no YaRN attention scaling on a plain rope


def test_oracle_honours_the_convention(shifted_checkpoint, shifted_reference, prompts):
    """LinearSpec stays AR whatever the drafts; FastDiffuser's output depends on the convention
    (negative control: the same weights read unshifted denoise differently)."""
    unshifted = NLDReference.from_pretrained(shifted_checkpoint, shift_logits=False)
    differs = 0
    for ids in prompts[:4]:
        ar = ar_generate(shifted_reference, ids, 32, eos_id=11).tokens
        assert linearspec_generate(shifted_reference, ids, 32, eos_id=11).tokens == ar
        differs += (fastdiffuser_generate(shifted_reference, ids, 32, eos_id=11).tokens
                    != fastdiffuser_generate(unshifted, ids, 32, eos_id=11).tokens)
    assert differs >= 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linearspec", "fastdiffuser"])
def test_served_equals_oracle(server_pool, shifted_checkpoint, shifted_reference, prompts, mode):
    server = server_pool.get(shifted_checkpoint, mode)
    oracle = linearspec_generate if mode == "linearspec" else fastdiffuser_generate
    expected = [oracle(shifted_reference, ids, 40, eos_id=11) for ids in prompts]
    responses = generate_many(server, prompts, 40)
    assert [r["output_ids"] for r in responses] == [e.tokens for e in expected]
    assert [meta(r, "nemodiff_forwards") for r in responses] == [e.forwards for e in expected]
    if mode == "linearspec":
        assert [r["output_ids"] for r in responses] == \
            [ar_generate(shifted_reference, ids, 40, eos_id=11).tokens for ids in prompts]
    assert generate(server, prompts[0], 8)["output_ids"] == expected[0].tokens[:8]


# ----- causal_seed: the seed row of a bidirectional pass runs causally with the base weights -----

@pytest.fixture(scope="module")
def seed_causal_checkpoint(tmp_path_factory):
    from sglang_nemodiff.checkpoint import write_random_checkpoint

    return write_random_checkpoint(str(tmp_path_factory.mktemp("seedcausal") / "tiny-seed-causal"),
                                   seed=3, lora_rank=8, causal_seed=True, **CONVERTED_LAYOUT)


@pytest.fixture(scope="module")
def seed_causal_reference(seed_causal_checkpoint):
    return NLDReference.from_pretrained(seed_causal_checkpoint)


def test_causal_seed_row_is_ar(seed_causal_reference, prompts):
    """The seed's output in a draft pass is the causal pass's (AR's next token); the masks still
    see the seed (negative control: the same block without causal_seed gives other seed logits)."""
    from sglang_nemodiff.reference.model import KVCache

    ref = seed_causal_reference
    mask_id = ref.config.mask_token_id
    cache = KVCache()
    cache.append(ref(torch.tensor(prompts[2]), cache)[1])
    block = torch.full((8,), mask_id)
    block[0] = prompts[2][-1]
    causal, _ = ref(block[:1], cache, causal=True)
    draft, draft_kv = ref(block, cache, causal=False, use_draft_lora=True)
    _, causal_kv = ref(block[:1], cache, causal=True)
    # slot 1's prediction (shifted: raw row 0) is AR's, and the seed's K/V are the committed ones
    assert torch.allclose(draft[1], causal[0], atol=1e-5)
    assert all(torch.allclose(d[0][:, :1], c[0], atol=1e-5) for d, c in zip(draft_kv, causal_kv))
    ref.config.causal_seed = False
    try:
        open_seed, _ = ref(block, cache, causal=False, use_draft_lora=True)
    finally:
        ref.config.causal_seed = True
    assert not torch.allclose(open_seed[1], causal[0], atol=1e-3)


def test_causal_seed_first_draft_always_accepted(seed_causal_checkpoint, seed_causal_reference,
                                                 prompts):
    """Greedy LinearSpec: every round accepts at least the first draft; output stays AR's
    (negative control: without causal_seed some rounds reject their first draft)."""
    open_seed = NLDReference.from_pretrained(seed_causal_checkpoint, causal_seed=False)
    with_seed, without = [], []
    for ids in prompts[:4]:
        result = linearspec_generate(seed_causal_reference, ids, 32, eos_id=11, block_size=8)
        assert result.tokens == ar_generate(seed_causal_reference, ids, 32, eos_id=11).tokens
        with_seed += result.accept_lengths
        without += linearspec_generate(open_seed, ids, 32, eos_id=11, block_size=8).accept_lengths
    assert min(with_seed) >= 1
    assert min(without) == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch_native", "nemodiff"])
def test_causal_seed_served_equals_oracle(server_pool, seed_causal_checkpoint, seed_causal_reference,
                                          prompts, backend):
    """Both attention backends that draw the seed-causal mask serve == the oracle, forwards
    included (the forwards depend on every round's accepted drafts)."""
    server = server_pool.get(seed_causal_checkpoint, "linearspec", "--attention-backend", backend)
    expected = [linearspec_generate(seed_causal_reference, ids, 40, eos_id=11) for ids in prompts]
    responses = generate_many(server, prompts, 40)
    assert [r["output_ids"] for r in responses] == [e.tokens for e in expected]
    assert [meta(r, "nemodiff_forwards") for r in responses] == [e.forwards for e in expected]


@pytest.mark.slow
def test_quadratic_served_equals_oracle_on_the_converted_layout(server_pool, seed_causal_checkpoint,
                                                                seed_causal_reference, prompts):
    """Quadratic on a shifted, causal_seed checkpoint (groups of b - 1 masks, the first group row
    drafts the slot after the bonus) through the nemodiff backend: == AR, the oracle's forwards."""
    server = server_pool.get(seed_causal_checkpoint, "quadratic", "--attention-backend", "nemodiff")
    prompts = prompts[:4]
    expected = [quadratic_generate(seed_causal_reference, ids, 40, eos_id=11) for ids in prompts]
    responses = generate_many(server, prompts, 40)
    assert [r["output_ids"] for r in responses] == [e.tokens for e in expected] == \
        [ar_generate(seed_causal_reference, ids, 40, eos_id=11).tokens for ids in prompts]
    assert [meta(r, "nemodiff_forwards") for r in responses] == [e.forwards for e in expected]


def test_causal_seed_refuses_a_backend_without_the_mask(monkeypatch):
    import sglang.srt.runtime_context as runtime_context

    from sglang_nemodiff.model import GRAPH_SAFE_BACKENDS, SEED_CAUSAL_BACKENDS, check_backend

    monkeypatch.setattr(runtime_context, "attention_backends", lambda: ("nemodiff", "torch_native"))
    check_backend("causal_seed", SEED_CAUSAL_BACKENDS)
    with pytest.raises(ValueError, match="cuda_graphs.*'torch_native'"):
        check_backend("cuda_graphs", GRAPH_SAFE_BACKENDS)  # graph-safe passes: nemodiff only
    monkeypatch.setattr(runtime_context, "attention_backends", lambda: ("triton", "triton"))
    with pytest.raises(ValueError, match="causal_seed.*'triton'"):
        check_backend("causal_seed", SEED_CAUSAL_BACKENDS)
