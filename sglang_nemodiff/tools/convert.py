"""Convert a Llama-family AR checkpoint (a GGUF file or an HF directory) into an NLD checkpoint.

    python -m sglang_nemodiff.tools.convert SOURCE OUT [--gguf-file NAME] [--block-size 32]
        [--dtype float32|bfloat16] [--draft-lora DIR]

The weights are read by transformers (its GGUF loader dequantizes with `gguf` and undoes
llama.cpp's Q/K permutation), so AR mode of the converted model is the source model: the same
tensors under the NLD names (`encoder.*`), a tied head, the source's RoPE as it is (plain RoPE stays
plain: no YaRN, no Llama-4 query scaling), and the tokenizer with its chat template. The draft
convention of converted AR models is the shifted one (`shift_logits: true`, config.py), with the
block's seed run causally in draft passes (`causal_seed: true`: the first draft is AR's own). The mask
token is one of the tokenizer's special tokens that neither the chat template nor bos/eos/pad/unk
use (converted models never saw it: a draft adapter teaches the model what it means).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from sglang_nemodiff.checkpoint import config_json
from sglang_nemodiff.config import NemotronLabsDiffusionConfig

SUPPORTED_SOURCES = ("llama",)
# Bumped when a converted directory's contents change for the same source (cached conversions,
# bundled/smol.py, are rebuilt): 2 = causal_seed.
FORMAT_VERSION = 2


def load_source(source: str, gguf_file: str | None = None):
    """(model, tokenizer) of an AR checkpoint: `source` is an HF directory, or a GGUF file (or
    its directory with `gguf_file`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None and source.endswith(".gguf"):
        source, gguf_file = os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    if model.config.model_type not in SUPPORTED_SOURCES:
        raise ValueError(f"{source}: model_type {model.config.model_type!r} is not a Llama-family "
                         f"model this converter knows ({', '.join(SUPPORTED_SOURCES)})")
    return model.eval(), tokenizer


def pick_mask_token(tokenizer) -> int:
    """The last special token that nothing in normal use emits: not bos/eos/pad/unk and not
    named by the chat template."""
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            tokenizer.unk_token_id}
    template = tokenizer.chat_template or ""
    candidates = [i for i, t in tokenizer.added_tokens_decoder.items()
                  if t.special and i not in used and t.content not in template]
    if not candidates:
        raise ValueError("the tokenizer has no unused special token to serve as the mask token")
    return max(candidates)


def nld_config(source_config, mask_token_id: int, block_size: int) -> NemotronLabsDiffusionConfig:
    c = source_config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in ("default", "yarn"):
        raise ValueError(f"RoPE type {rope['rope_type']!r} is not supported (default or yarn)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("biased attention/MLP projections are not supported")
    eos = c.eos_token_id
    return NemotronLabsDiffusionConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=float(c.rms_norm_eps), rope_parameters=rope, mask_token_id=mask_token_id,
        block_size=block_size, shift_logits=True, causal_seed=True, ar_mode=False, bos_token_id=c.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=c.pad_token_id, tie_word_embeddings=bool(c.tie_word_embeddings))


def nld_state_dict(model, tied: bool, dtype) -> dict[str, torch.Tensor]:
    """The source tensors under the NLD names (`model.*` -> `encoder.*`; the head only if untied)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model."):
            out["encoder." + name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            if not tied:
                out["diffusion_head.weight"] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"unexpected source tensor {name}")
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def convert(source: str, out: str, gguf_file: str | None = None, block_size: int = 32,
            dtype: torch.dtype = torch.float32, draft_lora: str | None = None) -> str:
    from safetensors.torch import save_file

    from sglang_nemodiff.checkpoint import check_checkpoint

    model, tokenizer = load_source(source, gguf_file)
    config = nld_config(model.config, pick_mask_token(tokenizer), block_size)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    raw = config_json(config)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    save_file(nld_state_dict(model, config.tie_word_embeddings, dtype),
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if draft_lora:
        shutil.copytree(draft_lora, os.path.join(tmp, "linear_spec_lora"))
    check_checkpoint(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a finished directory or none: an interrupted conversion leaves no half
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="HF directory or .gguf file of a Llama-family AR model")
    parser.add_argument("out", help="output NLD checkpoint directory")
    parser.add_argument("--gguf-file", help="GGUF file name inside SOURCE (a directory)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--draft-lora", help="a draft adapter directory to ship as linear_spec_lora/")
    args = parser.parse_args(argv)
    path = convert(args.source, args.out, args.gguf_file, args.block_size,
                   getattr(torch, args.dtype), args.draft_lora)
    print(path)


if __name__ == "__main__":
    main()


def llama_from_nld(path: str, dtype=torch.float32):
    """transformers' own `LlamaForCausalLM` on a converted checkpoint's weights: the independent
    oracle of AR mode (tests), and the fast batched generator of the draft distillation."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    config = LlamaConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], head_dim=raw["head_dim"],
        hidden_act=raw["hidden_act"], max_position_embeddings=raw["max_position_embeddings"],
        rms_norm_eps=raw["rms_norm_eps"], rope_parameters=raw["rope_parameters"],
        tie_word_embeddings=raw["tie_word_embeddings"], bos_token_id=raw["bos_token_id"],
        eos_token_id=raw["eos_token_id"], pad_token_id=raw.get("pad_token_id"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    renamed = {("model." + k[len("encoder."):]) if k.startswith("encoder.") else
               "lm_head.weight" if k == "diffusion_head.weight" else k: v for k, v in state.items()}
    model.load_state_dict(renamed, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[0]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers off the meta device
    return model.to(dtype).eval()
