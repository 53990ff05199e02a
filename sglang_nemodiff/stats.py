"""Per-request decoding stats: forwards spent, tokens per forward, accepted drafts per block."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("sglang_nemodiff")

META_KEYS = ("nemodiff_algorithm", "nemodiff_forwards", "nemodiff_tokens_per_forward",
             "nemodiff_blocks", "nemodiff_accept_length")
LOG_INTERVAL_S = 10.0


class RequestStats:
    __slots__ = ("algorithm", "forwards", "blocks", "accepted")

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self.forwards = 0
        self.blocks = 0
        self.accepted = 0

    def add_round(self, stats: dict, is_block: bool):
        self.forwards += stats.get("forwards", 0)
        if is_block:
            self.blocks += 1
            self.accepted += stats.get("accepted") or 0


def publish_stats(req) -> None:
    """Attach the final stats to the request's meta_info (request-level customized info)."""
    stats = req.nemodiff_stats
    tokens = len(req.output_ids) if req.finished_len is None else req.finished_len
    values = {
        "nemodiff_algorithm": stats.algorithm.removeprefix("Nemodiff").lower(),
        "nemodiff_forwards": stats.forwards,
        "nemodiff_tokens_per_forward": round(tokens / max(stats.forwards, 1), 4),
        "nemodiff_blocks": stats.blocks,
    }
    if stats.algorithm == "NemodiffLinearSpec":
        # Tokens committed per block: accepted drafts plus the bonus token.
        values["nemodiff_accept_length"] = round(stats.accepted / max(stats.blocks, 1) + 1, 4)
    req.customized_info = {**(req.customized_info or {}), **{k: [v] for k, v in values.items()}}


class _Interval:
    last = time.monotonic()
    forwards = tokens = blocks = accepted = 0
    drafted = False  # a LinearSpec round (with an acceptance count) was seen


def log_interval_stats(batch, round_stats) -> None:
    """A periodic log line like SGLang's speculative-decoding stats."""
    for req, stats in zip(batch.reqs, round_stats):
        if stats is None:
            continue
        _Interval.forwards += stats.get("forwards", 0)
        if "keep" in stats:
            _Interval.tokens += stats["keep"]
            _Interval.blocks += 1
            if stats.get("accepted") is not None:
                _Interval.accepted += stats["accepted"]
                _Interval.drafted = True
        else:
            _Interval.tokens += 1
    now = time.monotonic()
    if now - _Interval.last < LOG_INTERVAL_S or not _Interval.forwards:
        return
    msg = (f"[nemodiff] #blocks: {_Interval.blocks}, #forwards: {_Interval.forwards}, "
           f"tokens/forward: {_Interval.tokens / _Interval.forwards:.2f}")
    if _Interval.drafted:
        msg += f", accept len: {_Interval.accepted / max(_Interval.blocks, 1) + 1:.2f}"
    logger.info(msg)
    _Interval.last = now
    _Interval.forwards = _Interval.tokens = _Interval.blocks = _Interval.accepted = 0
    _Interval.drafted = False
