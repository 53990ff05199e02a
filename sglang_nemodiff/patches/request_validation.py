"""Reject prompt token ids outside the vocabulary before they reach the scheduler.

Stock SGLang 0.5.23 checks `token_ids_logprob` against the vocabulary but not the prompt ids: an
id >= vocab_size (or < 0) reaches the embedding inside the scheduler, raises IndexError there, and
the whole server exits. The tokenizer manager validates every request (/generate, the OpenAI
endpoints, sgl.Engine) in `_validate_one_request`; a ValueError raised there is answered with
HTTP 400 and the request never reaches the scheduler. Applied to NLD checkpoints only. The mask
id is an ordinary in-vocabulary id here: a prompt may contain it.

Also rejected: a prompt that is empty after tokenization (`"text": ""` with a tokenizer that adds
no BOS). SGLang rejects `input_ids: []` but lets an empty tokenized text through, and a
zero-token prefill crashes the scheduler in the rotary embedding.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger("sglang_nemodiff")

TARGETS = ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",)


def out_of_vocab_message(input_ids, vocab_size: int) -> str | None:
    """None if every id is an int in [0, vocab_size), else a message naming the first bad one."""
    if not input_ids:
        return None
    try:
        lo, hi = min(input_ids), max(input_ids)
        if 0 <= lo and hi < vocab_size and all(isinstance(t, int) for t in (lo, hi)):
            return None
    except TypeError:
        pass
    for position, token in enumerate(input_ids):
        if isinstance(token, bool) or not isinstance(token, int):
            return f"input_ids[{position}] is {token!r}, not an integer token id"
        if not 0 <= token < vocab_size:
            return (f"input_ids[{position}] = {token} is outside the vocabulary; valid token ids "
                    f"are 0..{vocab_size - 1}")
    return None


def _is_nld(manager) -> bool:
    from sglang_nemodiff.config import ARCHITECTURE

    architectures = getattr(manager.model_config.hf_config, "architectures", None) or []
    return ARCHITECTURE in architectures


def validate_one_request(original, manager, obj, input_ids):
    if input_ids is not None and _is_nld(manager):
        message = out_of_vocab_message(input_ids, manager.model_config.vocab_size)
        if len(input_ids) == 0 and getattr(obj, "input_embeds", None) is None:
            message = "the prompt is empty (no tokens after tokenization)"
        if message is not None:
            logger.warning("[nemodiff] rejected request %s: %s", getattr(obj, "rid", None), message)
            raise ValueError(message)
    return original(manager, obj, input_ids)


def apply() -> None:
    HookRegistry.register(TARGETS[0], validate_one_request, HookType.AROUND)
