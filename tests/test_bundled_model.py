"""The bundled small NLD checkpoint: layout, size, loading, tokenizer ids, lossless LinearSpec on
held-out prompts with the self-distilled draft LoRA accepting drafts, the batched training forward
and the distillation forward == the reference forward, and the distillation's LinearSpec replay ==
the reference LinearSpec.

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
ACCEPT_FLOOR = 2.5  # mean accepted drafts per block on 2 held-out edit prompts (2.94 measured; 0.57 without the LoRA)


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
    from safetensors import safe_open

    # The LinearSpec draft adapter, and the quadratic mode's own (launch/train_quadratic_draft.py).
    for lora in (os.path.join(PATH, "linear_spec_lora"), os.path.join(PATH, "quadratic_lora")):
        with open(os.path.join(lora, "adapter_config.json")) as f:
            adapter = json.load(f)
        assert adapter["target_modules"] == ["o_proj"] and adapter["r"] > 0 and adapter["lora_alpha"] > 0
        with safe_open(os.path.join(lora, "adapter_model.safetensors"), "pt") as f:
            for i in range(raw["num_hidden_layers"]):
                key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
                width = raw["num_attention_heads"] * raw["head_dim"]
                assert tuple(f.get_slice(f"{key}.lora_A.weight").get_shape()) == (adapter["r"], width)
                assert tuple(f.get_slice(f"{key}.lora_B.weight").get_shape()) == (raw["hidden_size"], adapter["r"])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(PATH) for f in fs)
    assert size <= 32 * 1024 * 1024, size


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
    """Lossless at temperature 0, and the self-distilled draft LoRA accepts drafts: on two held-out
    edit prompts (64 new tokens) the drafts accepted per block stay above a floor, well above the
    same model's drafts without the LoRA."""
    from sglang_nemodiff.tools.training import heldout_prompt_sets

    assert model.draft_lora is not None
    sets = heldout_prompt_sets(tokenizer, n_per_set=3, max_new_tokens=64)
    prompts = sets["edit"][:2] + sets["continuation"][:1]
    assert len(prompts) == 3
    with_lora, without = [], []
    for p in prompts:
        ar = ar_generate(model, p.input_ids, 64, eos_id=11)
        ls = linearspec_generate(model, p.input_ids, 64, eos_id=11)
        assert ls.tokens == ar.tokens, p.name  # lossless at temperature 0
        base = linearspec_generate(model, p.input_ids, 64, eos_id=11, use_draft_lora=False)
        assert base.tokens == ar.tokens, p.name
        if p.name.startswith("edit"):
            with_lora += ls.accept_lengths
            without += base.accept_lengths
    mean = sum(with_lora) / len(with_lora)
    assert mean >= ACCEPT_FLOOR, (mean, with_lora)
    assert mean >= 2 * sum(without) / len(without), (with_lora, without)


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


def test_distillation_forward_and_replay_match_reference(model, tokenizer):
    """The distillation's cached-prefix forward (with the draft LoRA) is the reference draft pass,
    its batched greedy decoding is AR, and its LinearSpec replay gives the reference LinearSpec's
    tokens per forward and accepted drafts."""
    from safetensors.torch import load_file

    from sglang_nemodiff.tools.distill import (
        DraftLoRA, LinearSpecEval, block_batch, forward_cached, greedy_generate)
    from sglang_nemodiff.tools.training import NLDTrainModel, heldout_prompt_sets

    train = NLDTrainModel(model.config)
    state = load_file(os.path.join(PATH, "model.safetensors"))
    train.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    train.eval().requires_grad_(False)
    c = model.config
    lora_state = load_file(os.path.join(PATH, "linear_spec_lora", "adapter_model.safetensors"))
    with open(os.path.join(PATH, "linear_spec_lora", "adapter_config.json")) as f:
        adapter = json.load(f)
    lora = DraftLoRA(c.num_hidden_layers, c.num_attention_heads * c.head_dim, c.hidden_size, adapter["r"],
                     adapter["lora_alpha"])
    with torch.no_grad():
        for i in range(c.num_hidden_layers):
            key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            lora.A[i].copy_(lora_state[f"{key}.lora_A.weight"])
            lora.B[i].copy_(lora_state[f"{key}.lora_B.weight"])
    sets = heldout_prompt_sets(tokenizer, n_per_set=2, max_new_tokens=40)
    prompts = [sets["edit"][0], sets["continuation"][0]]
    seqs = greedy_generate(train, [p.input_ids for p in prompts], 40, 11)
    for p, s in zip(prompts, seqs):
        assert s.tokens[len(p.input_ids):] == ar_generate(model, p.input_ids, 40, eos_id=11).tokens, p.name
    seeds = [s.prompt_len + 3 for s in seqs]
    ids, pos, past, mask, _ = block_batch(seqs, seeds, 1, c.mask_token_id, 32, "cpu")
    with torch.no_grad():
        draft, _ = forward_cached(train, ids, pos, past, mask, lora)
    for r, (s, p) in enumerate(zip(seqs, seeds)):
        cache = KVCache()
        _, kv = model(torch.tensor(s.tokens[:p]), cache, causal=True)
        cache.append(kv)
        block = torch.full((32,), c.mask_token_id)
        block[0] = s.tokens[p]
        ref, _ = model(block, cache, causal=False, use_draft_lora=True)
        torch.testing.assert_close(draft[r], ref, atol=1e-4, rtol=0)
    replay = LinearSpecEval(train, [p.input_ids for p in prompts], [40, 40], 11, c.mask_token_id)(train, lora)
    runs = [linearspec_generate(model, p.input_ids, 40, eos_id=11) for p in prompts]
    assert replay["tokens"] == sum(len(r.tokens) for r in runs)
    assert replay["forwards"] == sum(r.forwards for r in runs)
