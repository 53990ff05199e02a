"""The bundled trained checkpoint through the real SGLang runtime, in all three modes, and the
draft-only LoRA observed inside SGLang (its acceptance equals the oracle's with the LoRA on)."""

import os
import shutil

import pytest

from conftest import generate_many, meta
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
    fast = [fastdiffuser_generate(bundled_reference, ids, MAX_NEW, eos_id=11) for ids in bundled_prompts]
    served = {algorithm: generate_many(server_pool.get(path, algorithm), bundled_prompts, MAX_NEW)
              for algorithm in ("ar", "fastdiffuser", "linearspec")}
    assert [r["output_ids"] for r in served["ar"]] == ar
    assert [r["output_ids"] for r in served["linearspec"]] == ar  # lossless
    assert [r["output_ids"] for r in served["fastdiffuser"]] == [f.tokens for f in fast]
    for mode in ("fastdiffuser", "linearspec"):
        tpf = [meta(r, "nemodiff_tokens_per_forward") for r in served[mode]]
        print(f"bundled {mode}: tokens/forward per prompt {tpf}")


def test_draft_lora_is_applied_in_sglang(server_pool, bundled_prompts, tmp_path_factory):
    from sglang_nemodiff.checkpoint import write_random_lora

    path = str(tmp_path_factory.mktemp("lora") / "nld-tiny-lora")
    shutil.copytree(bundled_model_path(), path)
    reference = NLDReference.from_pretrained(path)
    write_random_lora(os.path.join(path, "linear_spec_lora"), reference.config, rank=8, seed=7,
                      scale=0.5)
    reference = NLDReference.from_pretrained(path)
    responses = generate_many(server_pool.get(path, "linearspec"), bundled_prompts, MAX_NEW)
    with_lora, without = [], []
    for ids, response in zip(bundled_prompts, responses):
        on = linearspec_generate(reference, ids, MAX_NEW, 11, use_draft_lora=True)
        off = linearspec_generate(reference, ids, MAX_NEW, 11, use_draft_lora=False)
        assert response["output_ids"] == on.tokens == off.tokens  # verify never uses the LoRA
        assert meta(response, "nemodiff_forwards") == on.forwards
        with_lora.append(on.forwards)
        without.append(off.forwards)
    assert with_lora != without  # the adapter changes drafts, and SGLang follows the LoRA oracle
