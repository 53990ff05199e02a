"""What one forward computes, decided once per forward by the algorithm (`PassKind`) and carried
to every consumer as data.

A diffusion round runs one model in several pass kinds: a causal verify or refresh, a
bidirectional denoise, a draft (bidirectional, the draft adapter on), a quadratic round (its
own pattern, the adapter on the mask rows). Three things differ between them: the attention
pattern among the block's tokens (`mask`, the structured-attention kernel's mask kinds), whether
the draft adapter runs, and a quadratic round's shape. `PassKind.data()` writes them into four
int32 values (`DATA_FIELDS`) that a forward can read as a tensor, so one captured graph (a CUDA
graph, a `torch.compile` graph) serves every kind: the rows that run the adapter and the
pattern each attention row draws are computed from that tensor inside the forward
(`adapter_rows`), never chosen in Python.

SGLang-free (the oracle's tests and the GPU check import it without SGLang).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from sglang_nemodiff.kernels.structured_attention import (
    BLOCK_BIDIRECTIONAL,
    CAUSAL,
    QUADRATIC,
    SEED_CAUSAL,
)
from sglang_nemodiff.quadratic_layout import QuadraticLayout

DATA_FIELDS = ("mask", "adapter", "quad_len", "quad_group")
NAMES = {CAUSAL: "causal", BLOCK_BIDIRECTIONAL: "bidirectional", SEED_CAUSAL: "seed_causal",
         QUADRATIC: "quadratic"}


@dataclass(frozen=True)
class PassKind:
    mask: int  # the attention pattern among the block's tokens (structured_attention kinds)
    adapter: bool = False  # the draft adapter, on every row but the base rows (adapter_rows)
    layout: Optional[QuadraticLayout] = None  # a quadratic round's shape (mask QUADRATIC only)

    def __post_init__(self):
        if (self.mask == QUADRATIC) != (self.layout is not None):
            raise ValueError("a quadratic pass, and only it, has a layout")

    @classmethod
    def resolve(cls, causal: bool, adapter: bool = False, layout: Optional[QuadraticLayout] = None,
                causal_seed: bool = False) -> "PassKind":
        """The kind of an algorithm's pass: causal, a quadratic round, or bidirectional (its seed
        row causal on a causal_seed checkpoint)."""
        if causal:
            return cls(CAUSAL)
        if layout is not None:
            return cls(QUADRATIC, adapter, layout)
        return cls(SEED_CAUSAL if causal_seed else BLOCK_BIDIRECTIONAL, adapter)

    @property
    def causal(self) -> bool:
        return self.mask == CAUSAL

    @property
    def name(self) -> str:
        return ("draft" if self.adapter and self.mask != QUADRATIC else NAMES[self.mask])

    def data(self) -> list[int]:
        layout = self.layout
        return [self.mask, int(self.adapter), layout.block_len if layout else 0,
                layout.group if layout else 1]


Scalar = Union[int, bool, torch.Tensor]


def adapter_rows(mask: Scalar, adapter: Scalar, quad_len: Scalar, tokens: int, batch: int,
                 device=None, dtype=torch.float32) -> torch.Tensor:
    """[tokens, 1] 1.0 on the rows that run the draft adapter, 0.0 elsewhere, for a batch of
    `batch` requests with tokens // batch rows each. Base rows (AR's weights even when the
    adapter is on): a seed-causal pass's seeds (each block's row 0) and a quadratic round's block
    rows (the first quad_len of each request). The arguments may be Python values (an eager
    forward) or 0-dim tensors read from the pass data (a captured one): the same arithmetic."""
    row = torch.arange(tokens, device=device) % (tokens // batch)
    base = ((row == 0) & (mask == SEED_CAUSAL)) | ((row < quad_len) & (mask == QUADRATIC))
    return ((~base) & (adapter != 0)).to(dtype).unsqueeze(1)


def shifts_logits(mask: Scalar, shift_logits: bool) -> Scalar:
    """Whether a pass's logits are re-indexed per slot (reference.model.slot_logits): the
    bidirectional passes of a shifted (converted AR) checkpoint; never a causal or quadratic one."""
    if not shift_logits:
        return False
    return (mask == BLOCK_BIDIRECTIONAL) | (mask == SEED_CAUSAL)
