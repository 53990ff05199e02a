"""Forward timings for the block-size policy's cost table, without stalling a GPU every forward.

Only `block_size: auto` needs them (at a fixed block size nothing is timed). A CPU forward has
finished when `model_runner.forward` returns, so the host clock times it. A CUDA forward is only
queued then: a pair of CUDA events brackets it and the timings are read once per round (`flush`),
after the round has copied its decisions to the host, which waits for those forwards anyway; no
`torch.cuda.synchronize` per forward."""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

import torch


class ForwardTimer:
    def __init__(self):
        self._pending: List[Tuple[int, "torch.cuda.Event", "torch.cuda.Event"]] = []

    def start(self, on_cuda: bool):
        if on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started, query_tokens: int, observe: Callable[[int, float], None]) -> None:
        if isinstance(started, float):
            observe(query_tokens, time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((query_tokens, started, end))

    def flush(self, observe: Optional[Callable[[int, float], None]]) -> None:
        """Report the queued CUDA timings (call once the round's results are on the host)."""
        pending, self._pending = self._pending, []
        if observe is None:
            return
        for query_tokens, start, end in pending:
            end.synchronize()  # already complete after the round's device-to-host copies
            observe(query_tokens, start.elapsed_time(end) / 1e3)
