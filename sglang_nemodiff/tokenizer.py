"""Byte-level BPE tokenizers laid out like NLD's: control tokens first, mask id 100, EOS 11.

Ids 0..127 are special tokens (so the real NLD ids hold: EOS `<|im_end|>` = 11, `<think>` = 12,
`</think>` = 13, mask `<|mask|>` = 100), then the 256 byte tokens, then BPE merges (if trained).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NUM_SPECIAL = 128
MASK_ID, EOS_ID, BOS_ID, PAD_ID = 100, 11, 1, 0
NAMED_SPECIALS = {0: "<pad>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>",
                  12: "<think>", 13: "</think>", 100: "<|mask|>"}
SPECIAL_TOKENS = [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIAL)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = NUM_SPECIAL + 256):
    """A `PreTrainedTokenizerFast`; with a corpus, BPE merges are trained up to `vocab_size`."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if corpus is None or vocab_size <= NUM_SPECIAL + 256:
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        vocab.update({ch: NUM_SPECIAL + i for i, ch in enumerate(sorted(alphabet))})
        tokenizer = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    else:
        tokenizer = _byte_level(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=alphabet, show_progress=False)
        tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, (tok, tokenizer.token_to_id(tok))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        mask_token="<|mask|>", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
