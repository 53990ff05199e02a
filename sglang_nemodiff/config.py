"""`NemotronLabsDiffusionConfig`: the HF config of NLD checkpoints, without remote code.

Field names follow the released checkpoints' `config.json`. RoPE values live in `rope_parameters`
(transformers 5.x layout); a legacy top-level `rope_theta` / `rope_scaling` is folded into it.
"""

from __future__ import annotations

from transformers import PretrainedConfig

MODEL_TYPE = "nemotron_labs_diffusion"
ARCHITECTURE = "NemotronLabsDiffusionModel"

DEFAULT_ROPE_PARAMETERS = {
    "rope_type": "yarn",
    "rope_theta": 1_000_000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}

# Fields a checkpoint's config.json must state: the model cannot be built without them.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "mask_token_id",
)


class NemotronLabsDiffusionConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 34,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 262144,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mask_token_id: int = 100,
        block_size: int = 32,
        dlm_paradigm: str = "bidirectional",
        ar_mode: bool = False,
        shift_logits: bool = False,
        causal_seed: bool = False,
        bos_token_id: int = 1,
        eos_token_id: int = 11,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # A config that names a plain rope (converted Llama-family models) gets no YaRN or
        # Llama-4 defaults: only what it states.
        plain = (rope_parameters or {}).get("rope_type", "yarn") != "yarn"
        rope = {} if plain else dict(DEFAULT_ROPE_PARAMETERS)
        # Legacy layouts: top-level rope_theta / rope_scaling (transformers 4.x configs).
        legacy_scaling = kwargs.pop("rope_scaling", None) or {}
        rope.update({k: v for k, v in legacy_scaling.items() if k != "type"})
        if "rope_theta" in kwargs:
            rope["rope_theta"] = kwargs.pop("rope_theta")
        if rope_parameters:
            rope.update(rope_parameters)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope
        self.attention_bias = attention_bias
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.dlm_paradigm = dlm_paradigm
        self.ar_mode = ar_mode
        # The draft convention. False (NLD checkpoints): in a bidirectional pass the output at
        # block slot j predicts the token at slot j. True (AR models converted by
        # tools/convert.py, as Fast-dLLM v2 and Dream convert them): slot j predicts slot j + 1,
        # as the AR head does. The model classes turn either into per-slot logits (model.py,
        # reference/model.py), so every algorithm reads "slot j's prediction" the same way.
        self.shift_logits = bool(shift_logits)
        # How a bidirectional pass runs the block's seed (slot 0, a committed token). False (NLD
        # checkpoints): like every slot, it sees the whole block (and runs the draft adapter in a
        # draft pass). True (converted AR models): it attends causally (the prefix and itself) with
        # the base weights, so its K/V are the committed ones and, with the shifted convention, its
        # output is AR's own prediction for slot 1: the first draft is always right at T = 0. The
        # masks still see the seed and each other. The draft adapter must be trained this way
        # (tools/distill_chat.py: causal_seed).
        self.causal_seed = bool(causal_seed)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if not self.architectures:
            self.architectures = [ARCHITECTURE]

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # Loading a checkpoint: name the missing/wrong field instead of silently defaulting it.
        validate_config_dict(config_dict)
        return super().from_dict(config_dict, **kwargs)

    # SGLang's Llama-family code reads `rope_theta` / `rope_scaling` attributes.
    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def rope_scaling(self) -> dict:
        return self.rope_parameters


# The released model sizes; all share vocab 131072, GQA 32/8 heads and head_dim 128.
REAL_CONFIGS = {
    "3B": dict(hidden_size=3072, num_hidden_layers=26, intermediate_size=9216),
    "8B": dict(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=16384),
}


def real_config(size: str, **overrides) -> NemotronLabsDiffusionConfig:
    return NemotronLabsDiffusionConfig(**REAL_CONFIGS[size], **overrides)


def validate_config_dict(raw: dict, source: str = "config.json") -> None:
    """Fail with the name of the first missing/wrong field of a raw config.json dict."""
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise ValueError(
            f"{source}: Nemotron-Labs Diffusion config is missing required field(s) "
            f"{', '.join(missing)}"
        )
    for field in REQUIRED_FIELDS:
        if not isinstance(raw[field], int) or isinstance(raw[field], bool):
            raise ValueError(f"{source}: field {field} must be an integer, got {raw[field]!r}")
    if raw["num_attention_heads"] % raw["num_key_value_heads"]:
        raise ValueError(
            f"{source}: num_attention_heads ({raw['num_attention_heads']}) must be a multiple "
            f"of num_key_value_heads ({raw['num_key_value_heads']})"
        )
    if not 0 <= raw["mask_token_id"] < raw["vocab_size"]:
        raise ValueError(f"{source}: mask_token_id {raw['mask_token_id']} outside the vocabulary")
