"""The quadratic self-speculation oracle (reference/quadratic.py): its attention layout against a
brute-force construction from the rules, and its output == AR (greedy) on an NLD checkpoint and
on a converted-layout one, one forward per round."""

import os

import pytest
import torch

from sglang_nemodiff.reference import NLDReference, ar_generate, linearspec_generate, quadratic_generate
from sglang_nemodiff.reference.quadratic import group_size, quadratic_layout


def brute_force_layout(L, g, groups=None):
    """Straight from the rules: d_i at +i sees d_0..d_i; group i's masks at +i+1..+i+g see
    d_0..d_i and their own group (groups after the first `groups` d_i only); the adapter runs on
    mask rows only."""
    k = L if groups is None else min(groups, L)
    rows = [("d", i, i) for i in range(L)] + [("m", i, i + 1 + j) for i in range(k) for j in range(g)]
    allowed = torch.zeros(len(rows), len(rows), dtype=torch.bool)
    for r, (kind_r, owner_r, _) in enumerate(rows):
        for c, (kind_c, owner_c, _) in enumerate(rows):
            if kind_c == "d":
                allowed[r, c] = owner_c <= owner_r
            else:
                allowed[r, c] = kind_r == "m" and owner_r == owner_c
    offsets = torch.tensor([pos for _, _, pos in rows])
    return offsets, allowed, torch.tensor([kind == "m" for kind, _, _ in rows])


@pytest.mark.parametrize("L,g,groups", [(1, 4, None), (3, 3, None), (4, 5, None), (16, 16, None),
                                         (6, 3, 2), (16, 16, 4), (2, 3, 5)])
def test_layout_matches_brute_force(L, g, groups):
    offsets, allowed, is_mask = quadratic_layout(L, g, groups=groups)
    want = brute_force_layout(L, g, groups)
    assert torch.equal(offsets, want[0]) and torch.equal(allowed, want[1]) and torch.equal(is_mask, want[2])
    assert allowed.shape == (L + min(groups or L, L) * g,) * 2


def test_layout_negative_control():
    """A layout whose masks see every block token (all groups alike) differs from the rules."""
    offsets, allowed, is_mask = quadratic_layout(3, 2)
    wrong = allowed.clone()
    wrong[3:, :3] = True
    assert not torch.equal(wrong, brute_force_layout(3, 2)[1])


def test_group_size_by_convention():
    assert group_size(16, shift_logits=False) == 16  # b (b + 1) query tokens
    assert group_size(16, shift_logits=True) == 15  # b * b


@pytest.mark.parametrize("block_size", [4, 16])
def test_equals_ar_one_forward_per_round(reference, prompts, block_size):
    for ids in prompts[:4]:
        ar = ar_generate(reference, ids, 40, eos_id=11)
        q = quadratic_generate(reference, ids, 40, eos_id=11, block_size=block_size)
        assert q.tokens == ar.tokens
        assert q.forwards == 1 + len(q.accept_lengths)  # the prefill, then one per round
        assert all(0 <= a < block_size for a in q.accept_lengths)


def test_equals_ar_on_converted_layout(tmp_path, prompts):
    from sglang_nemodiff.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(str(tmp_path / "shifted"), seed=3, lora_rank=8, shift_logits=True,
                                   causal_seed=True, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = NLDReference.from_pretrained(path)
    for ids in prompts[:3]:
        assert quadratic_generate(model, ids, 32, eos_id=11, block_size=8).tokens == \
            ar_generate(model, ids, 32, eos_id=11).tokens


def test_fewer_forwards_than_linearspec_on_the_bundled_model():
    """On a model whose drafts hit, one forward per round commits more per forward than
    LinearSpec's two (the measured ratio is in docs/perf.md)."""
    from transformers import AutoTokenizer

    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    path = bundled_model_path()
    bundled_reference = NLDReference.from_pretrained(path)
    quadratic_reference = NLDReference.from_pretrained(path, quadratic=True)  # its quadratic_lora
    sets = heldout_prompt_sets(AutoTokenizer.from_pretrained(path), n_per_set=2, continuation_tokens=96)
    lin = quad = quad_linearspec_adapter = 0
    for ids in [p.input_ids for p in sets["continuation"] + sets["edit"]]:
        lin += linearspec_generate(bundled_reference, ids, 64, 11, block_size=16).forwards
        quad += quadratic_generate(quadratic_reference, ids, 64, 11, block_size=16).forwards
        quad_linearspec_adapter += quadratic_generate(bundled_reference, ids, 64, 11, block_size=16).forwards
    assert quad < quad_linearspec_adapter < lin  # the quadratic adapter drafts its groups better


def test_quadratic_adapter_is_chosen_when_present(tmp_path):
    """checkpoint.adapter_dir, the one decision the server and the oracle share: quadratic rounds
    run `quadratic_lora/` when the checkpoint has one, else the LinearSpec adapter; every other
    mode runs the LinearSpec adapter."""
    import shutil

    from sglang_nemodiff.checkpoint import adapter_dir, write_random_checkpoint, write_random_lora

    path = write_random_checkpoint(str(tmp_path / "ckpt"), seed=1, lora_rank=4)
    assert adapter_dir(path, quadratic=True) == adapter_dir(path) == os.path.join(path, "linear_spec_lora")
    write_random_lora(os.path.join(path, "quadratic_lora"), NLDReference.from_pretrained(path).config, 4, 9)
    assert adapter_dir(path, quadratic=True) == os.path.join(path, "quadratic_lora")
    assert adapter_dir(path) == os.path.join(path, "linear_spec_lora")
    quadratic, linearspec = (NLDReference.from_pretrained(path, quadratic=q) for q in (True, False))
    assert not torch.equal(quadratic.draft_lora[0][0], linearspec.draft_lora[0][0])
    shutil.rmtree(os.path.join(path, "quadratic_lora"))


@pytest.mark.parametrize("groups", [1, 3])
def test_sparse_equals_ar(reference, prompts, groups):
    """Sparse quadratic (groups after the first block tokens only) is still exactly AR; a round
    that accepts past its groups is followed by one without drafts."""
    for ids in prompts[:4]:
        q = quadratic_generate(reference, ids, 40, eos_id=11, block_size=8, groups=groups)
        assert q.tokens == ar_generate(reference, ids, 40, eos_id=11).tokens
        assert q.forwards == 1 + len(q.accept_lengths)


def test_sampled_oracle_has_ar_distribution_with_negative_control():
    """The sampled oracle (temperature 0.7, top-p 0.9, drafts accepted by the speculative rule)
    on the bundled model with its quadratic adapter: 300 samples of the first three tokens
    against AR's exact probabilities from SGLang's own sampler code; the same samples against
    AR at temperature 0.4 are rejected (the test bites), and drafts were accepted (the rule ran,
    not only the bonus draw)."""
    import sys

    from transformers import AutoTokenizer

    from sglang_nemodiff.bundled import bundled_model_path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distribution import triple_cells, triple_pvalue

    path = bundled_model_path()
    model = NLDReference.from_pretrained(path, quadratic=True)
    prompt = AutoTokenizer.from_pretrained(path)("    def __init__(self, path):\n        self.",
                                                 add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(0)
    runs = [quadratic_generate(model, prompt, 3, block_size=16, temperature=0.7, top_p=0.9,
                               generator=generator) for _ in range(300)]
    outputs = [r.tokens for r in runs]
    took_draft = sum(max(r.accept_lengths, default=0) > 0 for r in runs)
    pvalue, outside = triple_pvalue(triple_cells(model, prompt, 0.7, 0.9), outputs)
    wrong, _ = triple_pvalue(triple_cells(model, prompt, 0.4, 0.9), outputs)
    print(f"oracle T=0.7 top_p=0.9: p={pvalue:.3f} (negative control p={wrong:.2e}), "
          f"{took_draft}/300 took a draft")
    assert outside == 0 and pvalue > 1e-3
    assert wrong < 1e-3
    assert took_draft > 10
    # Greedy stays AR: temperature 0 through the same code.
    assert quadratic_generate(model, prompt, 24, 11).tokens == ar_generate(model, prompt, 24, 11).tokens
