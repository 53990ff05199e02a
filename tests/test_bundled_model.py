"""The bundled small NLD checkpoint (issue 6): layout, size, loading, tokenizer ids, lossless
LinearSpec on held-out prompts, and the batched training forward == the reference forward.

CPU only, no server, well under a minute.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.checkpoint import check_checkpoint
from sglang_nemodiff.reference.generate import ar_generate, linearspec_generate
from sglang_nemodiff.reference.model import KVCache, NLDReference

PATH = bundled_model_path()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return NLDReference.from_pretrained(PATH, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(PATH)


def test_checkpoint_layout_and_size():
    check_checkpoint(PATH)
    with open(os.path.join(PATH, "config.json")) as f:
        raw = json.load(f)
    assert raw["model_type"] == "nemotron_labs_diffusion"
    assert raw["architectures"] == ["NemotronLabsDiffusionModel"]
    assert raw["mask_token_id"] == 100 and raw["eos_token_id"] == 11 and raw["block_size"] == 32
    with open(os.path.join(PATH, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 11
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert os.path.isfile(os.path.join(PATH, name)), name
    size = sum(os.path.getsize(os.path.join(PATH, f)) for f in os.listdir(PATH))
    assert size <= 30 * 1024 * 1024, size


def test_bundled_path_cli():
    out = subprocess.run([sys.executable, "-m", "sglang_nemodiff.bundled"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert os.path.samefile(out, PATH)


def test_tokenizer_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == 100
    assert tokenizer.eos_token_id == 11
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 11
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "def f(x):\n    return x\n"


def test_loads_and_is_trained(model, tokenizer):
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("import os\nimport sys\n\n\ndef main():\n    ", add_special_tokens=False)["input_ids"]
    logits, _ = model(torch.tensor(ids), causal=True)
    assert torch.isfinite(logits).all()
    # A trained model is clearly better than uniform (log V = 7.6 nats) on ordinary Python source.
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert nll < 0.75 * torch.log(torch.tensor(float(len(tokenizer))))


def test_linearspec_equals_ar_on_heldout(model, tokenizer):
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    sets = heldout_prompt_sets(tokenizer, n_per_set=3, max_new_tokens=48)
    prompts = sets["edit"][:2] + sets["continuation"][:1]
    assert len(prompts) == 3
    for p in prompts:
        ar = ar_generate(model, p.input_ids, 48, eos_id=11)
        ls = linearspec_generate(model, p.input_ids, 48, eos_id=11)
        assert ls.tokens == ar.tokens, p.name  # lossless at temperature 0


def test_training_forward_matches_reference(model):
    """The batched training module computes exactly NLDReference's function (fp32, atol 1e-4)."""
    from safetensors.torch import load_file

    from sglang_nemodiff.tools.training import NLDTrainModel, block_attention_mask

    train = NLDTrainModel(model.config)
    state = load_file(os.path.join(PATH, "model.safetensors"))
    missing = train.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    train.eval()
    gen = torch.Generator().manual_seed(0)
    S, bs = 72, 32
    clean = torch.randint(128, model.config.vocab_size, (2, S), generator=gen)
    with torch.no_grad():
        causal = train(clean)
        for b in range(2):
            ref, _ = model(clean[b], causal=True)
            torch.testing.assert_close(causal[b], ref, atol=1e-4, rtol=0)
        # Noisy blocks: bidirectional inside, over the clean causal prefix before their start.
        starts = torch.tensor([[5, 40], [17, 33]])
        noisy = torch.randint(128, model.config.vocab_size, (2, 2, bs), generator=gen)
        noisy[..., 1::2] = model.config.mask_token_id
        ids = torch.cat([clean, noisy.reshape(2, -1)], 1)
        pos = torch.cat([torch.arange(S).expand(2, S), (starts[:, :, None] + torch.arange(bs)).reshape(2, -1)], 1)
        out = train(ids, pos, block_attention_mask(S, starts, bs))
        torch.testing.assert_close(out[:, :S], causal, atol=1e-4, rtol=0)
        for b in range(2):
            for k in range(2):
                cache = KVCache()
                _, kv = model(clean[b, : starts[b, k]], cache, causal=True)
                cache.append(kv)
                ref, _ = model(noisy[b, k], cache, causal=False)
                torch.testing.assert_close(out[b, S + k * bs : S + (k + 1) * bs], ref, atol=1e-4, rtol=0)
