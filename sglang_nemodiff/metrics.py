"""Prometheus metrics of the NLD modes, on SGLang's `/metrics` with `--enable-metrics`.

Made with `prometheus_client` in the scheduler process, as SGLang makes its own: SGLang sets
`PROMETHEUS_MULTIPROC_DIR` before it starts the schedulers, so these series land in the same
multiprocess files its HTTP server aggregates (counters and histograms summed over processes:
DP ranks add up). Only the scheduler that logs SGLang's stats (attention-TP rank 0) counts, so
under TP every figure is counted once. Labels: `model_name` (SGLang's served model name) and
`algorithm`.

Per round (live while requests run), from the same `RoundResult`s the requests' meta_info sums:
- `nemodiff_forwards_total{pass_kind}`: forwards by kind (stats.PASS_KINDS), counted per request
  that took part (a forward over a batch of 4 counts 4, as each request's `nemodiff_forwards` does).
- `nemodiff_blocks_total{block_size}`: blocks by the block size the round ran (`auto` shows its
  choices here; an AR-steps round counts its steps as blocks of size 1).
- `nemodiff_accepted_drafts`: histogram of accepted drafts per drafted block (quadratic rounds, LinearSpec rounds
  with B >= 2; a quadratic round without drafts, a request's first or one after another kind of
  round, counts 0, as in meta_info's `nemodiff_accept_length`; the block policy leaves it out).
Per finished request:
- `nemodiff_requests_total`, `nemodiff_committed_tokens_total` (its output tokens),
- `nemodiff_tokens_per_forward`: histogram of each request's tokens per forward.
"""

from __future__ import annotations

from typing import Optional

from sglang_nemodiff.stats import RequestStats, RoundResult

ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TPF_BUCKETS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0)


class NemodiffMetrics:
    """The plugin's series for one scheduler (one per process: prometheus_client's registry
    refuses a second set of the same names)."""

    def __init__(self, labels: dict):
        from prometheus_client import Counter, Histogram

        names = list(labels)
        self.labels = labels
        self.requests = Counter("nemodiff_requests", "Finished requests of an NLD mode",
                                names).labels(**labels)
        self.tokens = Counter("nemodiff_committed_tokens",
                              "Output tokens of finished requests of an NLD mode",
                              names).labels(**labels)
        self.forwards = Counter("nemodiff_forwards",
                                "Forwards by pass kind, counted per request that took part",
                                names + ["pass_kind"])
        self.blocks = Counter("nemodiff_blocks", "Blocks by the block size their round ran",
                              names + ["block_size"])
        self.accepted = Histogram("nemodiff_accepted_drafts", "Accepted drafts per drafted block",
                                  names, buckets=ACCEPTED_BUCKETS).labels(**labels)
        self.tokens_per_forward = Histogram("nemodiff_tokens_per_forward",
                                            "Tokens per forward of each finished request", names,
                                            buckets=TPF_BUCKETS).labels(**labels)

    def observe_round(self, result: RoundResult) -> None:
        for kind, n in result.passes:
            if n:
                self.forwards.labels(**self.labels, pass_kind=kind).inc(n)
        if result.is_block:
            self.blocks.labels(**self.labels, block_size=str(result.block_size)).inc(result.steps)
            if result.accepted is not None and result.block_size > 1:
                self.accepted.observe(result.accepted)

    def observe_finished(self, stats: RequestStats, tokens: int) -> None:
        self.requests.inc()
        self.tokens.inc(tokens)
        if stats.forwards:
            self.tokens_per_forward.observe(tokens / stats.forwards)


def scheduler_metrics(scheduler, mode: str) -> Optional[NemodiffMetrics]:
    """The scheduler's metrics, made on first use; None without --enable-metrics or on a
    scheduler that does not log stats (TP ranks > 0)."""
    if not hasattr(scheduler, "nemodiff_metrics"):
        scheduler.nemodiff_metrics = None
        from sglang.srt.runtime_context import get_observability, get_parallel, get_serving

        parallel = get_parallel()
        if (get_observability().enable_metrics and parallel.attn_tp_rank == 0
                and getattr(parallel, "attn_cp_rank", 0) == 0):
            scheduler.nemodiff_metrics = NemodiffMetrics(
                {"model_name": get_serving().served_model_name, "algorithm": mode})
    return scheduler.nemodiff_metrics
