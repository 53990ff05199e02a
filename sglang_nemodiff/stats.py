"""What one round of an NLD algorithm did for one request, and the stats built from it.

`RoundResult` is the typed record an algorithm returns per request (through SGLang's
`dllm_algo_state` slot); the scheduler patch stores it once on the request
(`req.nemodiff_round`), where the KV stash reads `keep`, and folds it into the request's
`RequestStats` (meta_info) and the server's `IntervalStats` (the periodic log line), in the
manner of vLLM's SpecDecodingStats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from sglang_nemodiff.round_plan import RoundRecord

logger = logging.getLogger("sglang_nemodiff")

META_KEYS = ("nemodiff_algorithm", "nemodiff_forwards", "nemodiff_forwards_per_pass",
             "nemodiff_tokens_per_forward", "nemodiff_blocks", "nemodiff_blocks_per_size",
             "nemodiff_accept_length")
# The kinds of forward a request takes part in (`RoundResult.passes`): the causal prompt pass, a
# LinearSpec round's draft and verify passes, a FastDiffuser round's denoise passes and its causal
# refresh, a B = 1 round's AR steps, a quadratic round's one forward.
PASS_KINDS = ("prefill", "draft", "verify", "denoise", "refresh", "ar_step", "quadratic")
LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of the tokens a round emitted (one entry per token)."""

    token_logprobs: list  # [float]
    top_logprobs: Optional[list] = None  # [(values, ids)] per token
    ids_logprobs: Optional[list] = None  # [values for the requested ids] per token


@dataclass(frozen=True)
class RoundResult:
    """One request's share of one forward round."""

    passes: tuple  # ((pass kind, forwards), ...): the forwards the request took part in
    tokens: int  # tokens emitted
    keep: Optional[int] = None  # block rounds: leading block slots whose causal KV is kept
    accepted: Optional[int] = None  # LinearSpec: drafts accepted
    block_size: Optional[int] = None  # block rounds: the block size used (1: AR steps)
    logprobs: Optional[TokenLogprobs] = None
    steps: int = 1  # blocks of block_size the round counts as (a B = 1 round: its AR steps)
    groups: Optional[int] = None  # quadratic rounds: groups drafted (the block size when dense)
    # Quadratic: the drafts this round made for the request's next block (its next round's d_1..).
    next_drafts: Optional[tuple] = field(default=None, compare=False, repr=False)
    # The round as the block policy sees it (round_plan.py), one object shared by the round's
    # results; None when the round's plan was not timed.
    record: Optional[RoundRecord] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        unknown = [kind for kind, _ in self.passes if kind not in PASS_KINDS]
        assert not unknown, f"unknown pass kind(s) {unknown}"

    @property
    def forwards(self) -> int:
        return sum(n for _, n in self.passes)

    @property
    def is_block(self) -> bool:
        return self.keep is not None


@dataclass
class RequestStats:
    """Accumulated over a request's rounds; published in meta_info when it finishes."""

    mode: str
    forwards: int = 0
    blocks: int = 0
    accepted: int = 0
    drafted: bool = False
    block_sizes: dict = field(default_factory=dict)  # block size -> blocks
    passes: dict = field(default_factory=dict)  # pass kind -> forwards
    groups: dict = field(default_factory=dict)  # quadratic rounds: groups drafted -> rounds

    def add(self, result: RoundResult) -> None:
        self.forwards += result.forwards
        for kind, n in result.passes:
            if n:
                self.passes[kind] = self.passes.get(kind, 0) + n
        if result.is_block:
            self.blocks += result.steps
            self.block_sizes[result.block_size] = self.block_sizes.get(result.block_size, 0) + result.steps
        if result.groups is not None:
            self.groups[result.groups] = self.groups.get(result.groups, 0) + 1
        if result.accepted is not None:
            self.accepted += result.accepted
            self.drafted = True

    def meta_info(self, tokens: int) -> dict:
        values = {
            "nemodiff_algorithm": self.mode,
            "nemodiff_forwards": self.forwards,
            "nemodiff_forwards_per_pass": dict(sorted(self.passes.items())),
            "nemodiff_tokens_per_forward": round(tokens / max(self.forwards, 1), 4),
            "nemodiff_blocks": self.blocks,
            "nemodiff_blocks_per_size": {str(b): n for b, n in sorted(self.block_sizes.items())},
        }
        if self.groups:
            values["nemodiff_quadratic_groups"] = {str(k): n for k, n in sorted(self.groups.items())}
        if self.drafted:
            # Tokens committed per block: accepted drafts plus the bonus token.
            values["nemodiff_accept_length"] = round(self.accepted / max(self.blocks, 1) + 1, 4)
        return values


def publish_stats(req) -> int:
    """Attach the final stats to the request's meta_info (request-level customized info);
    returns the request's output tokens."""
    tokens = len(req.output_ids) if req.finished_len is None else req.finished_len
    values = req.nemodiff_stats.meta_info(tokens)
    req.customized_info = {**(req.customized_info or {}), **{k: [v] for k, v in values.items()}}
    return tokens


@dataclass
class IntervalStats:
    """Server-wide counters since the last log line (one instance per scheduler)."""

    forwards: int = 0
    tokens: int = 0
    blocks: int = 0
    accepted: int = 0
    drafted: bool = False
    block_sizes: dict = field(default_factory=dict)
    last_log: float = field(default_factory=time.monotonic)

    def observe(self, result: RoundResult) -> None:
        self.forwards += result.forwards
        self.tokens += result.tokens
        if result.is_block:
            self.blocks += result.steps
            if result.block_size is not None:
                self.block_sizes[result.block_size] = self.block_sizes.get(result.block_size, 0) + result.steps
        if result.accepted is not None:
            self.accepted += result.accepted
            self.drafted = True

    def reset(self) -> None:
        self.forwards = self.tokens = self.blocks = self.accepted = 0
        self.drafted = False
        self.block_sizes = {}
        self.last_log = time.monotonic()

    def line(self, last_choice=None) -> str:
        """The log line; `last_choice`: the block policy's latest decision (block_policy.Choice)."""
        msg = (f"[nemodiff] #blocks: {self.blocks}, #forwards: {self.forwards}, "
               f"tokens/forward: {self.tokens / max(self.forwards, 1):.2f}")
        if self.drafted:
            msg += f", accept len: {self.accepted / max(self.blocks, 1) + 1:.2f}"
        if self.block_sizes:
            sizes = ", ".join(f"{b}: {n}" for b, n in sorted(self.block_sizes.items()))
            msg += f", blocks per size: {{{sizes}}}"
        if last_choice is not None:
            msg += (f", last block size: {last_choice.block_size} ({last_choice.reason}, "
                    f"batch {last_choice.batch_size})")
            if last_choice.rates:
                msg += f", expected tok/s by candidate: {dict(last_choice.rates)}"
        return msg

    def maybe_log(self, last_choice=None) -> None:
        if self.forwards and time.monotonic() - self.last_log >= LOG_INTERVAL_S:
            logger.info(self.line(last_choice))
            self.reset()
