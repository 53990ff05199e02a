"""The bundled trained checkpoint through the real SGLang runtime, in all three modes, and the
draft-only LoRA observed inside SGLang (its acceptance equals the oracle's with the LoRA on)."""

import os

import pytest

from conftest import DENOISE_LORA, bundled_with_random_lora, generate_many, meta
from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.reference import (
    NLDReference,
    ar_generate,
    fastdiffuser_generate,
    linearspec_generate,
)

pytestmark = pytest.mark.slow
MAX_NEW = 48


@pytest.fixture(scope="module")
def bundled_prompts():
    from transformers import AutoTokenizer

    from sglang_nemodiff.tools.training import heldout_prompt_sets

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    sets = heldout_prompt_sets(tokenizer, n_per_set=2, continuation_tokens=96)
    return [p.input_ids for p in sets["continuation"] + sets["edit"]]


@pytest.fixture(scope="module")
def bundled_reference():
    return NLDReference.from_pretrained(bundled_model_path())


def test_bundled_serves_in_all_modes(server_pool, bundled_reference, bundled_prompts):
    path = bundled_model_path()
    ar = [ar_generate(bundled_reference, ids, MAX_NEW, eos_id=11).tokens for ids in bundled_prompts]
    served = {algorithm: generate_many(server_pool.get(path, algorithm), bundled_prompts, MAX_NEW)
              for algorithm in ("ar", "linearspec")}
    assert [r["output_ids"] for r in served["ar"]] == ar
    assert [r["output_ids"] for r in served["linearspec"]] == ar  # lossless
    print("bundled linearspec: tokens/forward per prompt",
          [meta(r, "nemodiff_tokens_per_forward") for r in served["linearspec"]])


def test_fastdiffuser_denoise_lora(server_pool, bundled_reference, bundled_prompts):
    """`denoise_lora: true`: FastDiffuser's denoise passes use the draft adapter inside SGLang
    (tokens and forwards equal the reference run with the adapter on, which differs from the
    base-weight FastDiffuser's; the FDFO test below covers the base weights)."""
    server = server_pool.get(bundled_model_path(), "fastdiffuser", *DENOISE_LORA)
    served = generate_many(server, bundled_prompts, MAX_NEW)
    on = [fastdiffuser_generate(bundled_reference, ids, MAX_NEW, eos_id=11, use_draft_lora=True)
          for ids in bundled_prompts]
    off = [fastdiffuser_generate(bundled_reference, ids, MAX_NEW, eos_id=11) for ids in bundled_prompts]
    assert [r["output_ids"] for r in served] == [f.tokens for f in on]
    assert [meta(r, "nemodiff_forwards") for r in served] == [f.forwards for f in on]
    assert [f.tokens for f in on] != [f.tokens for f in off]  # the premise: the adapter matters
    print("bundled fastdiffuser (denoise_lora): tokens/forward per prompt",
          [meta(r, "nemodiff_tokens_per_forward") for r in served],
          "base weights:", [round(f.tokens_per_forward, 2) for f in off])


@pytest.fixture(scope="module")
def random_lora_checkpoint(tmp_path_factory):
    return bundled_with_random_lora(tmp_path_factory.mktemp("lora"))


def _forwards_with_and_without(path, prompts):
    reference = NLDReference.from_pretrained(path)
    runs = [(linearspec_generate(reference, ids, MAX_NEW, 11, use_draft_lora=True),
             linearspec_generate(reference, ids, MAX_NEW, 11, use_draft_lora=False)) for ids in prompts]
    for on, off in runs:
        assert on.tokens == off.tokens  # verify never uses the LoRA
    return [on for on, _ in runs], [off for _, off in runs]


def test_draft_lora_is_applied_in_sglang(server_pool, bundled_prompts, random_lora_checkpoint):
    on, off = _forwards_with_and_without(random_lora_checkpoint, bundled_prompts)
    responses = generate_many(server_pool.get(random_lora_checkpoint, "linearspec"), bundled_prompts, MAX_NEW)
    assert [r["output_ids"] for r in responses] == [o.tokens for o in on]
    assert [meta(r, "nemodiff_forwards") for r in responses] == [o.forwards for o in on]
    # the adapter changes drafts, and SGLang follows the LoRA oracle
    assert [o.forwards for o in on] != [o.forwards for o in off]


def test_use_lora_false_and_lora_path_settings(server_pool, bundled_prompts, random_lora_checkpoint, tmp_path):
    """`use_lora: false` serves without the checkpoint's adapter; `lora_path` serves another one:
    each server spends exactly the forwards of the matching oracle."""
    on, off = _forwards_with_and_without(random_lora_checkpoint, bundled_prompts)
    (tmp_path / "off.yaml").write_text("block_size: 32\nuse_lora: false\n")
    (tmp_path / "path.yaml").write_text(
        f"block_size: 32\nlora_path: {os.path.join(random_lora_checkpoint, 'linear_spec_lora')}\n")
    cases = ((random_lora_checkpoint, "off.yaml", off), (bundled_model_path(), "path.yaml", on))
    for model, config, expected in cases:
        server = server_pool.get(model, "linearspec", "--algorithm-config", str(tmp_path / config))
        responses = generate_many(server, bundled_prompts, MAX_NEW)
        assert [meta(r, "nemodiff_forwards") for r in responses] == [e.forwards for e in expected], config
        assert [r["output_ids"] for r in responses] == [e.tokens for e in expected]


FDFO_TEXTS = ["def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument(",
              "import os\nimport sys\n\n", "class Config:\n    def __init__(self, path):\n        self.",
              "for i in range(10):\n    print(i * i)\n" * 3, "x = 1\n", "def main():\n"]


def test_fastdiffuser_first_done_first_out(server_pool, bundled_reference):
    """Concurrent FastDiffuser requests whose blocks resolve after different numbers of denoise
    steps (EOS early, or several tokens per step): each is forwarded, and charged, only until its
    own block resolves, so its served forwards equal the single-request reference's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    prompts = [tokenizer(text).input_ids for text in FDFO_TEXTS]
    expected = [fastdiffuser_generate(bundled_reference, ids, 64, eos_id=11) for ids in prompts]
    served = generate_many(server_pool.get(bundled_model_path(), "fastdiffuser"), prompts, 64)
    assert [r["output_ids"] for r in served] == [e.tokens for e in expected]
    forwards = [meta(r, "nemodiff_forwards") for r in served]
    assert forwards == [e.forwards for e in expected]
    assert len(set(forwards)) > 2, forwards  # the premise: the blocks resolve at different steps
