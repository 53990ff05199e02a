"""What a round is, decided once, and what it measured, reported once.

`RoundPlan`: decided by the scheduler side when the round's blocks are placed
(patches/dllm_req_fill_ids.py asks the block policy, block_policy.py) and carried by every
request of the round (`req.nemodiff_plan`): the positions patch, the algorithm and the KV stash
read it instead of rebuilding B from lengths.

`RoundRecord`: what the block policy learns from a round (its start, forward timings, accepted
drafts), built by the algorithm at the end of a round it was asked to time (`plan.timed`) and
handed back with the round's `RoundResult`s; the scheduler side feeds it to the policy once
(patches/dllm_scheduler_result.py), so the algorithms never reach the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sglang_nemodiff.quadratic_layout import QuadraticLayout


@dataclass(frozen=True)
class RoundPlan:
    block_size: int  # the round's B (1: AR steps in the modes that take them, ar_steps.py)
    slots: int  # block slots placed per request: B, or the AR steps of a B = 1 round
    timed: bool  # the policy chooses B (`block_size: auto`): forwards are timed for it
    # A quadratic round's shape (quadratic_layout.py; its slots are layout.tokens); None otherwise.
    layout: Optional[QuadraticLayout] = None
    # AR steps: the round ends after a step in which a request arrived if at least this many of
    # its steps were left (block_policy.py: steps_worth_a_round); None: it runs all its steps.
    yield_steps_left: Optional[int] = 1

    @property
    def ar_steps(self) -> bool:
        """A B = 1 round, taken as AR steps."""
        return self.block_size == 1

    @classmethod
    def fixed(cls, block_size: int) -> "RoundPlan":
        """A round whose requests carry no plan (unit tests drive the algorithms directly)."""
        return cls(block_size=block_size, slots=block_size, timed=False)


@dataclass(frozen=True)
class RoundRecord:
    """One round as the block policy sees it (shared by the round's RoundResults)."""

    started: float  # time.perf_counter() when the round began
    request_ids: tuple  # in row order
    block_size: int = 0  # B (1: AR steps); 0 for a prefill batch
    forward_times: tuple = ()  # (query tokens, seconds) per timed forward
    accepted: Optional[tuple] = None  # drafts accepted per request (drafted rounds; None for a
    # request without drafts this round, in a quadratic round)
    groups: Optional[int] = None  # a quadratic round's groups (the block size when dense); None otherwise

    @property
    def prefill(self) -> bool:
        return self.block_size == 0
