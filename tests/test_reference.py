"""The oracle itself: config sizes, RoPE against SGLang's YaRN, and the modes' basic contracts."""

import math

import pytest
import torch

from sglang_nemodiff.config import REAL_CONFIGS, NemotronLabsDiffusionConfig, real_config
from sglang_nemodiff.reference import (
    NLDReference,
    ar_generate,
    fastdiffuser_generate,
    linearspec_generate,
)
from sglang_nemodiff.reference.model import yarn_inv_freq_and_scale


def count_parameters(config) -> int:
    with torch.device("meta"):
        model = NLDReference(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, expected", [
    # embeddings + untied diffusion_head (2 × 131072 × hidden) + layers + final norm
    ("3B", 3_831_659_520), ("8B", 8_489_553_920), ("14B", 13_506_073_600)])
def test_real_configs_parameter_counts(size, expected):
    config = real_config(size)
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = h * (32 * 128) * 2 + h * (8 * 128) * 2 + 3 * h * i + 2 * h
    assert expected == 2 * 131072 * h + n * per_layer + h
    assert count_parameters(config) == expected
    assert config.num_attention_heads == 32 and config.num_key_value_heads == 8
    assert config.head_dim == 128 and config.vocab_size == 131072
    assert config.mask_token_id == 100 and config.eos_token_id == 11


def test_checkpoint_contract_for_real_configs():
    """The tensor names/shapes the SGLang loader demands add up to the same parameter counts."""
    from sglang_nemodiff.checkpoint import expected_tensor_shapes

    for size, expected in (("3B", 3_831_659_520), ("8B", 8_489_553_920), ("14B", 13_506_073_600)):
        shapes = expected_tensor_shapes(real_config(size))
        assert sum(math.prod(shape) for shape in shapes.values()) == expected
        assert shapes["diffusion_head.weight"] == (131072, REAL_CONFIGS[size]["hidden_size"])


def test_yarn_matches_sglang_rotary_embedding():
    """Our RoPE tables equal SGLang's YaRNScalingRotaryEmbedding (mscale / mscale_all_dim)."""
    from sglang_nemodiff.patches import vllm_stub

    vllm_stub.apply()  # SGLang's CPU rotary path imports vllm._custom_ops
    from sglang.srt.layers.rotary_embedding.yarn import YaRNScalingRotaryEmbedding

    rope = NemotronLabsDiffusionConfig().rope_parameters
    inv_freq, scale = yarn_inv_freq_and_scale(128, rope)
    theirs = YaRNScalingRotaryEmbedding(
        128, 128, rope["original_max_position_embeddings"], rope["rope_theta"], True,
        rope["factor"], torch.float32, beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"],
        mscale=rope["mscale"], mscale_all_dim=rope["mscale_all_dim"])
    assert torch.allclose(theirs._compute_inv_freq(rope["factor"]), inv_freq, rtol=1e-6)
    assert math.isclose(theirs.mscale, scale) and scale == 1.0  # mscale == mscale_all_dim


def test_llama4_query_scaling_identity_below_original_context():
    from sglang_nemodiff.reference.model import llama4_query_scale

    positions = torch.tensor([0, 16383, 16384, 3 * 16384])
    scale = llama4_query_scale(positions, 0.1, 16384)
    assert scale[:2].tolist() == [1.0, 1.0]
    assert torch.allclose(scale[2:], 1 + 0.1 * torch.log(torch.tensor([2.0, 4.0])))


def test_bidirectional_block_sees_the_future_causal_does_not(reference, prompts):
    from sglang_nemodiff.reference import KVCache

    cache = KVCache()
    _, kv = reference(torch.tensor(prompts[1]), cache, causal=True)
    cache.append(kv)
    block = torch.tensor([5, 100, 100, 100])
    changed = block.clone()
    changed[3] = 7
    causal_a, _ = reference(block, cache, causal=True)
    causal_b, _ = reference(changed, cache, causal=True)
    assert torch.equal(causal_a[:3], causal_b[:3])  # position 3 does not leak backwards
    bidir_a, _ = reference(block, cache, causal=False)
    bidir_b, _ = reference(changed, cache, causal=False)
    assert not torch.allclose(bidir_a[0], bidir_b[0])


def test_cached_forward_equals_full_forward(reference, prompts):
    """Prefill + 1-token steps give the same logits as one causal pass (the KV cache is right)."""
    from sglang_nemodiff.reference import KVCache

    ids = torch.tensor(prompts[3])
    full, _ = reference(ids, KVCache(), causal=True)
    cache = KVCache()
    head, kv = reference(ids[:10], cache, causal=True)
    cache.append(kv)
    steps = []
    for token in ids[10:]:
        logits, kv = reference(token[None], cache, causal=True)
        cache.append(kv)
        steps.append(logits)
    assert torch.allclose(torch.cat([head] + steps), full, atol=1e-4)


def test_linearspec_equals_ar_and_counts_two_forwards_per_block(reference, prompts):
    for ids in prompts:
        ar = ar_generate(reference, ids, 40, eos_id=11)
        spec = linearspec_generate(reference, ids, 40, eos_id=11)
        assert spec.tokens == ar.tokens
        assert spec.forwards == 1 + 2 * len(spec.accept_lengths)


def test_draft_lora_changes_drafts_not_output(reference, prompts):
    from sglang_nemodiff.reference import KVCache

    assert reference.draft_lora is not None
    cache = KVCache()
    _, kv = reference(torch.tensor(prompts[1]), cache, causal=True)
    cache.append(kv)
    block = torch.tensor([5] + [100] * 31)
    with_lora, _ = reference(block, cache, causal=False, use_draft_lora=True)
    without, _ = reference(block, cache, causal=False, use_draft_lora=False)
    assert not torch.equal(with_lora.argmax(-1), without.argmax(-1))
    for ids in prompts[:3]:
        assert (linearspec_generate(reference, ids, 30, 11, use_draft_lora=False).tokens
                == linearspec_generate(reference, ids, 30, 11, use_draft_lora=True).tokens)


def test_fastdiffuser_fills_blocks(reference, prompts):
    result = fastdiffuser_generate(reference, prompts[0], 64, eos_id=11)
    assert len(result.tokens) == 64 and 100 not in result.tokens
    # at least one commit per denoise step: at most 31 denoise + 1 refresh forwards per block
    assert result.forwards <= 1 + 2 * 32


def test_tokenizer_layout(tokenizer):
    assert tokenizer.convert_ids_to_tokens([11, 12, 13, 100]) == [
        "<|im_end|>", "<think>", "</think>", "<|mask|>"]
    assert tokenizer.eos_token_id == 11 and tokenizer.mask_token_id == 100
    assert tokenizer.decode(tokenizer("def f(x):\n    return x").input_ids) == "def f(x):\n    return x"
