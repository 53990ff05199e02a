"""The quadratic mode's round shape per batch (`--algorithm quadratic`, `block_size: auto`).

The same policy as LinearSpec's (block_policy.py: measured cost table, round overheads and
periods, per-request acceptance, budgets, start-up sweep, exploration) over other candidates:

- AR steps (key (1, 0)): `ar_steps` causal forwards of bs query tokens, `ar_steps` tokens;
- a quadratic round (b, k) for b in the block sizes up to the largest (16 unless the YAML says
  otherwise) and k in 1, 2, 4, .. b groups (k = b: dense): one forward of
  bs · (b + k · group) query tokens (quadratic_layout.py).

A quadratic round with drafts commits n = 1 + accepted tokens, E[n | b] from the acceptance
statistics as for LinearSpec (accepted counts of quadratic rounds). When n > k (more accepted
than groups drafted, probability P(accepted >= k)), the next round has no drafts and commits one
token (its block is the bonus alone; it drafts group 0, so the round after it has drafts). So a
round of (b, k) commits on average (E[n] + p) / (1 + p) tokens, with p = P(accepted >= k) (0 for
dense rounds). Rounds without drafts observe no acceptance (algorithms/quadratic.py leaves them
out of the record).

What the model leaves out: a quadratic round right after AR steps has no drafts either (the
measured period of the AR-step rounds of the batch does not see it); drafts made by a smaller b
than the next round's leave its last slots undrafted (counted as rejected there).
LinearSpec's B's are not candidates: a quadratic server holds the quadratic draft adapter, and
LinearSpec's blocks are drafted by the other one (checkpoint.adapter_dir).
"""

from __future__ import annotations

from typing import Optional, Sequence

from sglang_nemodiff.block_policy import BlockSizePolicy
from sglang_nemodiff.quadratic_layout import QuadraticLayout


class QuadraticPolicy(BlockSizePolicy):
    AR_KEY = (1, 0)

    def __init__(self, max_block: int, sizes: Sequence[int], ar_steps: int = 1,
                 shifted: bool = False):
        self.shifted = shifted  # the checkpoint's draft convention: a group's size
        super().__init__(max_block, sizes, ar_steps)

    @classmethod
    def candidates(cls, max_block: int, sizes: Sequence[int]) -> tuple:
        blocks = [b for b in sizes if 2 <= b <= max_block] or [max_block]
        groups = lambda b: [k for k in (1 << i for i in range(b.bit_length())) if k <= b]  # noqa: E731
        return (cls.AR_KEY,) + tuple((b, k) for b in blocks for k in groups(b))

    def layout(self, key) -> QuadraticLayout:
        b, k = key
        return QuadraticLayout.for_checkpoint(b, self.shifted, None if k >= b else k)

    def passes(self, key) -> int:
        return self.ar_steps if key == self.AR_KEY else 1

    def query_tokens(self, key) -> int:
        return 1 if key == self.AR_KEY else self.layout(key).tokens

    def split(self, key) -> tuple:
        if key == self.AR_KEY:
            return 1, None
        b, k = key
        return b, (None if k >= b else k)

    def key_of(self, block_size: int, groups: Optional[int] = None):
        if block_size == 1:
            return self.AR_KEY
        return block_size, min(groups or block_size, block_size)

    def request_tokens(self, key, sums: Sequence[float], budget: int) -> float:
        if key == self.AR_KEY:
            return float(min(self.ar_steps, budget))
        b, k = key
        drafted = sums[min(b, budget, len(sums) - 1)]
        # P(accepted >= k): the next round has no drafts (a dense round always drafts group n-1).
        undrafted = sums[k + 1] - sums[k] if k < b and k + 1 < len(sums) else 0.0
        return (drafted + undrafted) / (1.0 + undrafted)
