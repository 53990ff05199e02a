"""The quadratic mode's round shape per batch (`--algorithm quadratic`, `block_size: auto`).

The same policy as LinearSpec's (block_policy.py: measured cost table, round overheads and
periods, per-request acceptance, budgets, start-up sweep, exploration) over more candidates:

- AR steps (key (1, 0)): `ar_steps` causal forwards of bs query tokens, `ar_steps` tokens;
- a LinearSpec round of B (key (B, 0)): a draft and a verify forward of bs · B query tokens,
  drafted by the adapter this server loaded (the checkpoint's quadratic one when it has one:
  on the bundled model LinearSpec keeps 96% of its tokens per forward with it);
- a quadratic round (b, k) for b in the block sizes up to the largest (16 unless the checkpoint's
  is smaller) and k in 1, 2, 4 groups (k = b: dense, for b <= 4): one forward of
  bs · (b + k · group) query tokens (quadratic_layout.py).

Why at most `AUTO_MAX_GROUPS` groups: the scheduler reserves KV for the largest round a request
may run (patches/dllm_kv_pressure.py: round_slots) on every request it admits. A dense b = 16
round places 272 slots per request against 80 with 4 groups; with that headroom a pool that ran
32 requests at once under LinearSpec admitted fewer (quadratic auto fell to 0.87x LinearSpec
auto's tok/s at concurrency 32, 8,192-token pool), for a candidate that on the bundled model adds
12% tokens per forward over 4 groups (3.39 against 3.02 at b = 16). A fixed `block_size` keeps
dense rounds (and `quadratic_groups`).

LinearSpec and quadratic rounds keep apart acceptance statistics (their drafts differ: a
quadratic group drafts before the bonus is known). A quadratic round with drafts commits
n = 1 + accepted tokens, E[n | b] from its statistics as for LinearSpec. When n > k (more
accepted than groups drafted, probability P(accepted >= k)) the next round has no drafts and
commits one token (its block is the bonus alone; it drafts group 0, so the round after it has
drafts). So a round of (b, k) commits on average (E[n] + p) / (1 + p) tokens, with
p = P(accepted >= k) (0 for dense rounds). Rounds without drafts observe no acceptance
(algorithms/quadratic.py leaves them out of the record).

What the model leaves out: a quadratic round right after AR steps or a LinearSpec round has no
drafts either; drafts made by a smaller b than the next round's leave its last slots undrafted
(counted as rejected there). The measured period of each candidate sees part of both. For the
same reason an exploration of a quadratic candidate from another kind of round runs it twice in
a row: its first round has no drafts and observes nothing, the second measures its acceptance
(else a server settled on AR steps or LinearSpec would never learn that quadratic drafts improved).
"""

from __future__ import annotations

from typing import Optional, Sequence

from sglang_nemodiff.block_policy import Acceptance, BlockSizePolicy, _own_sums
from sglang_nemodiff.quadratic_layout import QuadraticLayout

LINEAR = 0  # the second half of a LinearSpec round's key (B, 0)
AUTO_MAX_GROUPS = 4  # quadratic rounds under `auto` draft at most this many groups (see above)


def largest_auto_layout(max_block: int, shifted: bool) -> QuadraticLayout:
    """The widest round `auto` may run: what the scheduler reserves and places at most."""
    return QuadraticLayout.for_checkpoint(max_block, shifted,
                                          AUTO_MAX_GROUPS if AUTO_MAX_GROUPS < max_block else None)


class QuadraticPolicy(BlockSizePolicy):
    AR_KEY = (1, LINEAR)

    def __init__(self, max_block: int, sizes: Sequence[int], ar_steps: int = 1,
                 shifted: bool = False):
        self.shifted = shifted  # the checkpoint's draft convention: a group's size
        super().__init__(max_block, sizes, ar_steps)
        # LinearSpec rounds' acceptance (self.acceptance / self.requests: quadratic rounds').
        self.linear = Acceptance(max_block)
        self.linear_requests = {}
        self.last_key = None  # the previous round's candidate
        self.follow = None  # a quadratic candidate explored from another kind: its second round

    def is_quadratic(self, key) -> bool:
        return key is not None and key != self.AR_KEY and key[1] != LINEAR

    def choose(self, batch_size: int, budgets=None, request_ids=None):
        if self.follow is not None:
            key, self.follow = self.follow, None
            self.rounds += 1
            choice = self._choice(key, batch_size, "explore")
        else:
            choice = super().choose(batch_size, budgets, request_ids)
            key = self.key_of(choice.block_size, choice.groups)
            if choice.reason == "explore" and self.is_quadratic(key) and not self.is_quadratic(self.last_key):
                self.follow = key
        self.last_key = key
        return choice

    @classmethod
    def candidates(cls, max_block: int, sizes: Sequence[int]) -> tuple:
        blocks = [b for b in sizes if 2 <= b <= max_block] or [max_block]
        groups = lambda b: [k for k in (1 << i for i in range(b.bit_length()))  # noqa: E731
                            if k <= min(b, AUTO_MAX_GROUPS)]
        return ((cls.AR_KEY,) + tuple((b, LINEAR) for b in blocks)
                + tuple((b, k) for b in blocks for k in groups(b)))

    def layout(self, key) -> QuadraticLayout:
        b, k = key
        return QuadraticLayout.for_checkpoint(b, self.shifted, None if k >= b else k)

    def passes(self, key) -> int:
        if key == self.AR_KEY:
            return self.ar_steps
        return 2 if key[1] == LINEAR else 1

    def query_tokens(self, key) -> int:
        b, k = key
        return b if k == LINEAR else self.layout(key).tokens

    def split(self, key) -> tuple:
        b, k = key
        return b, (None if k == LINEAR else k)

    def key_of(self, block_size: int, groups: Optional[int] = None):
        if block_size == 1:
            return self.AR_KEY
        return block_size, (LINEAR if groups is None else min(groups, block_size))

    def server_sums(self):
        rates = self.acceptance.rates(), self.linear.rates()
        return {"quadratic": (rates[0], _prefix(self.acceptance, rates[0])),
                "linear": (rates[1], _prefix(self.linear, rates[1]))}

    def request_sums(self, rid, server):
        return {"quadratic": _own_sums(self.requests.get(rid) if rid is not None else None, server["quadratic"]),
                "linear": _own_sums(self.linear_requests.get(rid) if rid is not None else None, server["linear"])}

    def stats(self, groups: Optional[int] = None) -> tuple:
        return (self.linear, self.linear_requests) if groups is None else (self.acceptance, self.requests)

    def request_stats(self) -> tuple:
        return self.requests, self.linear_requests

    def request_tokens(self, key, sums, budget: int) -> float:
        if key == self.AR_KEY:
            return float(min(self.ar_steps, budget))
        b, k = key
        if k == LINEAR:
            linear = sums["linear"]
            return linear[min(b, budget, len(linear) - 1)]
        quad = sums["quadratic"]
        drafted = quad[min(b, budget, len(quad) - 1)]
        # P(accepted >= k): the next round has no drafts (a dense round always drafts group n-1).
        undrafted = quad[k + 1] - quad[k] if k < b and k + 1 < len(quad) else 0.0
        return (drafted + undrafted) / (1.0 + undrafted)


def _prefix(acceptance: Acceptance, rates) -> list:
    from sglang_nemodiff.block_policy import _prefix_sums

    return _prefix_sums(acceptance.at_least(rates))
