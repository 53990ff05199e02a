"""Write and check NLD checkpoints in the real HF layout.

`write_random_checkpoint` makes a tiny random model for tests (config.json with the real field
names, safetensors with the real tensor names, a tokenizer with mask id 100 / EOS 11, and
optionally a `linear_spec_lora/` PEFT adapter). `check_checkpoint` names what is missing or wrong.
`adapter_dir` picks the draft adapter a mode runs (`quadratic_lora/` for quadratic when present).
"""

from __future__ import annotations

import json
import os

import torch

from sglang_nemodiff.config import ARCHITECTURE, MODEL_TYPE, NemotronLabsDiffusionConfig, validate_config_dict

TINY_CONFIG = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 1024, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "llama_4_scaling_beta": 0.1},
)


LINEAR_SPEC_ADAPTER = "linear_spec_lora"  # the checkpoint's draft adapter (NLD's name)
QUADRATIC_ADAPTER = "quadratic_lora"  # optional: drafts for quadratic rounds (their own layout)


def adapter_dir(path: str, quadratic: bool = False) -> str:
    """The draft adapter a kind of round runs, one decision for the served model and the oracle:
    quadratic rounds the checkpoint's own `quadratic_lora/` when it has one (its groups draft
    without knowing the bonus, a layout the LinearSpec adapter was not distilled for:
    launch/train_quadratic_draft.py), else `linear_spec_lora/`, which every other adapter pass
    runs."""
    if quadratic and os.path.isdir(os.path.join(path, QUADRATIC_ADAPTER)):
        return os.path.join(path, QUADRATIC_ADAPTER)
    return os.path.join(path, LINEAR_SPEC_ADAPTER)


def expected_tensor_shapes(config: NemotronLabsDiffusionConfig) -> dict[str, tuple[int, ...]]:
    c = config
    h, hd = c.hidden_size, c.head_dim
    shapes = {"encoder.embed_tokens.weight": (c.vocab_size, h), "encoder.norm.weight": (h,)}
    if not c.tie_word_embeddings:  # tied: the head is the embedding matrix
        shapes["diffusion_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"encoder.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (c.num_attention_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (c.num_key_value_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (c.num_key_value_heads * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.num_attention_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def config_json(config: NemotronLabsDiffusionConfig) -> dict:
    raw = config.to_dict()
    raw["model_type"] = MODEL_TYPE
    raw["architectures"] = [ARCHITECTURE]
    return raw


def write_random_checkpoint(path: str, seed: int = 0, lora_rank: int | None = None,
                            dtype=torch.float32, **config_overrides) -> str:
    """A random NLD checkpoint in the real HF layout; returns `path`."""
    from safetensors.torch import save_file

    from sglang_nemodiff.tokenizer import build_tokenizer

    os.makedirs(path, exist_ok=True)
    config = NemotronLabsDiffusionConfig(**{**TINY_CONFIG, **config_overrides})
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.randn(shape, generator=gen) * (0.5 if "embed" in name else shape[-1] ** -0.5)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json(config), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f)
    build_tokenizer().save_pretrained(path)
    if lora_rank:
        write_random_lora(os.path.join(path, "linear_spec_lora"), config, lora_rank, seed + 1)
    return path


def write_random_lora(path: str, config: NemotronLabsDiffusionConfig, rank: int, seed: int,
                      scale: float = 0.05):
    """A PEFT adapter like the real `linear_spec_lora/` (o_proj only, alpha = 4 r)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    width = config.num_attention_heads * config.head_dim
    tensors = {}
    for i in range(config.num_hidden_layers):
        key = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=gen) * width**-0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(config.hidden_size, rank, generator=gen) * scale
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 4 * rank,
                   "target_modules": ["o_proj"], "lora_dropout": 0.0, "bias": "none"}, f, indent=2)


def check_checkpoint(path: str) -> None:
    """Raise ValueError naming the first missing/wrong config field or tensor."""
    from safetensors import safe_open

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    validate_config_dict(raw, os.path.join(path, "config.json"))
    raw.pop("model_type", None)
    config = NemotronLabsDiffusionConfig(**raw)
    found = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    found[key] = tuple(f.get_slice(key).get_shape())
    for name, shape in expected_tensor_shapes(config).items():
        if name not in found:
            raise ValueError(f"checkpoint {path} is missing tensor {name}")
        if found[name] != shape:
            raise ValueError(f"tensor {name} has shape {list(found[name])}, expected {list(shape)}")
