"""LinearSpec's block size per batch (`block_size: auto`).

LinearSpec is lossless, so the block size B can change between rounds without changing any
output token. A round of B > 1 costs two forwards of bs·B query tokens (draft + verify) and
commits 1 + min(accepted, B-1) tokens per request; B = 1 is AR itself: no draft pass, one causal
forward per token, taken as `ar_steps` AR steps in one round (algorithms/ar_steps.py) so the
scheduler's round work is paid once per `ar_steps` tokens. The policy picks, for the batch
about to run, the B in {1, 2, 4, ..., max} that maximises expected committed tokens per second:

    bs · E[tokens | B] / (passes(B) · cost(bs · B) + overhead(bs))

(for B = 1: E[tokens] = passes = ar_steps, each pass of bs query tokens; a B = 1 round stops
once its requests reach their budgets, so it is priced at the steps it will take, each
forwarding the requests still in it)

- cost(n): seconds of one forward of n query tokens, from a table of timed forwards on the
  serving device (an exponential moving average per power-of-two bucket of n, interpolated
  in between, extrapolated linearly beyond). The first rounds after start-up sweep every B
  (logged) to fill it; every round refreshes it. A bucket's first timings take their minimum
  (`WARM_TIMINGS`): the first forward of a new shape pays one-time allocation, and a cold
  figure that stuck would keep that B unchosen, hence never re-timed.
- overhead(bs): the seconds of a round outside its forwards: the scheduler's work between two
  rounds of the same requests (batch assembly, KV allocation, the result path) plus the
  algorithm's own, timed as the period between round starts minus the round's forwards, per
  power-of-two bucket of bs. Paid once per round, it is what makes large blocks pay at small
  batches.
- Once a (batch-size bucket, B) pair has run, the measured period of its rounds (kept per
  request, so batch sizes within a bucket compare; read per round, linear in the batch size
  between the measured buckets: `measured_seconds`) replaces that model: part of the work outside the
  forwards grows with B (slots allocated and freed, tokens committed), and the model, blind to
  it, would keep an over-rated large B chosen. The model is optimistic for the pairs not yet
  run, so the policy tries them and then knows.
- E[tokens | B] = 1 + sum_{k=1}^{B-1} P(accepted >= k): the acceptance is a prefix, so the
  acceptance at a smaller B follows from the same statistics. P(accepted >= k) is a product of
  per-draft continuation rates over the blocks that reached each draft (`Acceptance`), decayed
  per round so it follows the traffic, with a weak prior that carries the last measured rate on
  to drafts no block has reached yet.
- Per request, not per server: the batch's expected tokens are the mean over its requests of
  E[min(tokens | B, r)], where r is what the request may still generate (its max_new_tokens
  less its output: the rest of a block is trimmed, so a large block late in a short request is
  credited only what it can deliver), and each request's rates are its own recent blocks'
  (`REQUEST_DECAY`) shrunk towards the server's (`REQUEST_WEIGHT` pseudo-blocks; on drafts its
  blocks never reached, the server's rate scaled by how the request compared at the last one it
  did; its B = 1 rounds, which observe no drafts, fade its own statistics). Acceptance
  moves along a request (a bundled-model answer that falls into a repeating stretch accepts
  whole blocks after blocks of 1-4 tokens): pooled over the server, those whole blocks made a
  32-token block look worth its cost at concurrency 1 where a 16-token one delivered the same
  tokens for less (held at B = 16: 1.12x the tok/s of B = 32, same forwards).
- Every `EXPLORE_EVERY`-th round takes another B than the best, each in turn from the largest
  down, so the acceptance at large blocks and the period of every B stay measured; only the B's
  rated at least `EXPLORE_FLOOR` of the best are explored (the others cannot win on noise).

One planner per scheduler (`round_planner`: kept on SGLang's DllmManager). It decides each
round's plan (round_plan.py) when the scheduler places the round's blocks, and learns from the
round's record once the scheduler has its results; the algorithms only carry the plan out and
time their forwards when `plan.timed`. Under tensor parallelism every rank must run the same B:
rank 0 decides and broadcasts it over the CPU group (the ranks' timings differ).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from sglang_nemodiff.round_plan import RoundPlan, RoundRecord

logger = logging.getLogger("sglang_nemodiff")

EXPLORE_EVERY = 32
EXPLORE_FLOOR = 0.5  # explored: the B's rated at least this share of the best's rate
DECAY = 0.995  # per round, acceptance statistics
COST_EMA = 0.2  # weight of a new timing in its bucket
WARM_TIMINGS = 3  # a bucket's first timings: their minimum (one-time costs of a new shape)
PERIOD_TIMINGS = WARM_TIMINGS  # rounds of a (batch size, B) pair before its measured period is used (their minimum: cold rounds right after start-up do not stick)
PRIOR_WEIGHT, PRIOR_RATE = 1.0, 0.8  # pseudo-blocks accepting each next draft with this rate
REQUEST_DECAY = 0.7  # per round of a request: its last few blocks carry its own acceptance
REQUEST_WEIGHT = 2.0  # pseudo-blocks of the server's rates behind each request's own
MAX_TRACKED = 1024  # requests with their own acceptance kept (finished ones are dropped)


@dataclass
class CostTable:
    """Seconds per forward of n query tokens, by power-of-two bucket of n."""

    seconds: dict = field(default_factory=dict)  # bucket exponent -> EMA seconds
    timings: dict = field(default_factory=dict)  # bucket exponent -> timings observed

    @staticmethod
    def bucket(n: int) -> int:
        return max(0, round(math.log2(max(n, 1))))

    def observe(self, n: int, seconds: float) -> None:
        b = self.bucket(n)
        old, count = self.seconds.get(b), self.timings.get(b, 0)
        if old is None:
            self.seconds[b] = seconds
        elif count < WARM_TIMINGS:
            self.seconds[b] = min(old, seconds)
        else:
            self.seconds[b] = (1 - COST_EMA) * old + COST_EMA * seconds
        self.timings[b] = count + 1

    def known(self, n: int, timings: int = WARM_TIMINGS) -> bool:
        """Timed enough to be trusted (the start-up sweep repeats a B until it is)."""
        return self.timings.get(self.bucket(n), 0) >= timings

    def cost(self, n: int) -> Optional[float]:
        """Interpolated in log2(n) between measured buckets, linear in n beyond them, flat below
        the first. Beyond them the slope is the larger of the last two buckets' and the whole
        table's: two neighbouring timings can be level or inverted by noise (a CPU forward of
        128 tokens timed no cheaper than one of 64), and a flat extrapolation rated every
        larger block as free, so it ran once at each new batch size before its cost was known;
        where forwards really are flat (a GPU well below its compute bound) both slopes are
        near zero."""
        if not self.seconds:
            return None
        x = math.log2(max(n, 1))
        points = sorted(self.seconds.items())
        if x <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        x1, y1 = points[-1]
        n1 = 2 ** x1
        if len(points) == 1:
            return y1 * n / n1  # one point: proportional
        slopes = [(y1 - y) / (n1 - 2 ** x) for x, y in (points[-2], points[0])]
        return y1 + max(max(slopes), 0.0) * (n - n1)


@dataclass
class Acceptance:
    """Decayed counts, per draft k, of the blocks that reached it (could accept it: B - 1 >= k,
    and accepted every draft before it) and of those that accepted it.

    P(accepted >= k) is the product of the per-draft continuation rates (a product-limit
    estimate): a block of B that accepted all its B - 1 drafts is censored there, not a failure,
    and the rates of early drafts use every block while those of late drafts use the blocks
    that got that far. A rate with little data leans on the one before it (the tail of a
    LinearSpec block continues the way its middle did: long agreeing stretches or none), so an
    untried large B is judged by the acceptance seen at smaller ones."""

    max_block: int
    reached: list = field(default_factory=list)  # index k: blocks that could accept draft k
    did: list = field(default_factory=list)  # index k: of those, accepted it
    decay: float = DECAY  # per observation (a round of the server, or a block of one request)

    def __post_init__(self):
        self.reached = [0.0] * self.max_block
        self.did = [0.0] * self.max_block

    def fade(self) -> None:
        """One observation's decay, with nothing observed."""
        for k in range(1, self.max_block):
            self.reached[k] *= self.decay
            self.did[k] *= self.decay

    def observe(self, block_size: int, accepted: Sequence[int]) -> None:
        self.fade()
        for a in accepted:
            for k in range(1, min(a + 1, block_size - 1) + 1):  # drafts 1 .. a+1 were reached
                self.reached[k] += 1
                self.did[k] += a >= k

    def rates(self, prior: Optional[Sequence[float]] = None, weight: float = PRIOR_WEIGHT) -> list:
        """Per-draft continuation rates, index k = 1 .. max_block-1 (index 0 unused). Each leans
        on `weight` pseudo-blocks of an anchor: without `prior` (the server's statistics) the rate
        of the draft before it; with `prior` (a request's, leaning on the server's rates) the
        prior's rate scaled by how the request's rate compared with it at the draft before, so a
        request that rejects early is not credited the server's tail on drafts it never reached
        (its tail continues the way its head went, as in the server's own estimate)."""
        rates, rate, ratio = [1.0], PRIOR_RATE, 1.0
        for k in range(1, self.max_block):
            anchor = rate if prior is None else min(1.0, prior[k] * ratio)
            rate = (self.did[k] + weight * anchor) / (self.reached[k] + weight)
            rates.append(rate)
            if prior is not None and prior[k] > 0:
                ratio = rate / prior[k]
        return rates

    def at_least(self, rates: Optional[Sequence[float]] = None) -> list:
        """P(accepted >= k) for k = 0 .. max_block-1, non-increasing in k."""
        probs, p = [1.0], 1.0
        for rate in (self.rates() if rates is None else rates)[1:]:
            p *= rate
            probs.append(p)
        return probs

    def expected_tokens(self, block_size: int) -> float:
        return sum(self.at_least()[:block_size])


@dataclass(frozen=True)
class Choice:
    """One round's decision and its inputs (logged, counted in meta_info by block size)."""

    block_size: int
    batch_size: int
    reason: str  # "policy" | "sweep" | "explore" | "fixed" | "cycle"
    rates: tuple = ()  # (candidate, expected tokens/s) per candidate
    overhead_ms: Optional[float] = None  # the round overhead the rates assumed
    groups: Optional[int] = None  # a quadratic round's groups (the block size when dense); None:
    # AR steps or a LinearSpec/FastDiffuser block


@dataclass
class _Round:
    """The round in progress, for the overhead measurement."""

    started: float
    requests: frozenset
    key: object  # the candidate the round ran (B here; (b, groups) for quadratic rounds)
    forward_seconds: float = 0.0
    forwards: int = 0
    other_work: bool = False  # a prefill step ran before the next round (not a round's overhead)


class BlockSizePolicy:
    """The choice among LinearSpec's B's. A candidate (`sizes`) is a key the cost model reads
    through `query_tokens`, `passes` and `request_tokens`, so another mode's rounds
    (quadratic_policy.py) reuse the tables, the sweep, the exploration and the statistics."""

    AR_KEY = 1  # the candidate that is AR steps

    def __init__(self, max_block: int, sizes: Sequence[int], ar_steps: int = 1):
        self.max_block = max_block
        self.ar_steps = max(1, min(ar_steps, max_block))  # AR steps of a B = 1 round
        self.sizes = self.candidates(max_block, sizes)
        self.cost = CostTable()
        self.overhead = CostTable()  # keyed by batch size: seconds per round outside forwards
        self.period = {}  # B -> CostTable keyed by batch size: seconds per round per request
        self.overhead_by_block = {}  # B -> CostTable keyed by batch size: overhead of its rounds
        self.acceptance = Acceptance(max_block)
        self.requests = {}  # request id -> Acceptance of its own blocks (REQUEST_DECAY)
        self.rounds = 0
        self.current: Optional[_Round] = None

    @staticmethod
    def candidates(max_block: int, sizes: Sequence[int]) -> tuple:
        return tuple(b for b in sizes if b <= max_block) or (max_block,)

    def passes(self, key) -> int:
        """Forwards of a round: a B = 1 round's AR steps, or a draft and a verify pass."""
        return self.ar_steps if key == self.AR_KEY else 2

    def query_tokens(self, key) -> int:
        """Query tokens per request of one of the round's forwards."""
        return key

    def split(self, key) -> tuple:
        """(block size, sparse groups or None) of a candidate."""
        return key, None

    def key_of(self, block_size: int, groups: Optional[int] = None):
        """The candidate a round of this shape ran."""
        return block_size

    def request_tokens(self, key, sums: Sequence[float], budget: int) -> float:
        """Expected tokens a round commits for a request that may generate `budget` more, with
        `sums` the prefix sums of its P(accepted >= k)."""
        if key == self.AR_KEY:
            return float(min(self.ar_steps, budget))
        return sums[min(key, budget, len(sums) - 1)]

    def tokens(self, key) -> float:
        """Expected tokens a round commits per request (no budgets, the server's acceptance)."""
        return self.request_tokens(key, self.request_sums(None, self.server_sums()), 1 << 30)

    def server_sums(self):
        """(the server's per-draft rates, prefix sums of its P(accepted >= k))."""
        rates = self.acceptance.rates()
        return rates, _prefix_sums(self.acceptance.at_least(rates))

    def request_sums(self, rid, server):
        """A request's prefix sums of P(accepted >= k): its own blocks' rates shrunk towards the
        server's (`server`: server_sums()), the server's for a request not seen yet."""
        return _own_sums(self.requests.get(rid) if rid is not None else None, server)

    def stats(self, groups: Optional[int] = None) -> tuple:
        """(server acceptance, per-request acceptance) a drafted round of this kind feeds."""
        return self.acceptance, self.requests

    def batch_tokens(self, budgets: Optional[Sequence[int]] = None,
                     request_ids: Optional[Sequence] = None) -> dict:
        """B -> expected tokens a round delivers per request of the batch: the mean over its
        requests of E[min(tokens | B, r)] with r the request's budget and its own acceptance
        (module docstring). Without budgets: the server's E[tokens | B]."""
        if not budgets:
            return {b: self.tokens(b) for b in self.sizes}
        server = self.server_sums()
        ids = request_ids if request_ids is not None and len(request_ids) == len(budgets) else [None] * len(budgets)
        totals = dict.fromkeys(self.sizes, 0.0)
        for r, rid in zip(budgets, ids):
            sums = self.request_sums(rid, server)
            r = max(1, r)
            for b in self.sizes:
                totals[b] += self.request_tokens(b, sums, r)
        return {b: t / len(budgets) for b, t in totals.items()}

    def overhead_s(self, batch_size: int) -> float:
        return self.overhead.cost(batch_size) or 0.0

    def model_overhead_s(self, batch_size: int) -> float:
        """The overhead the model assumes for a B not yet run at this batch size: the least
        measured here for any B (it grows with B), so the model errs optimistic and an untried
        B gets tried rather than written off."""
        measured = [t.cost(batch_size) for t in self.overhead_by_block.values()
                    if t.known(batch_size, PERIOD_TIMINGS)]
        return min(measured) if measured else self.overhead_s(batch_size)

    def rates(self, batch_size: int, budgets: Optional[Sequence[int]] = None,
              request_ids: Optional[Sequence] = None) -> list:
        """(B, expected committed tokens per second) for every candidate B; `budgets`: the
        tokens each request of the batch may still generate, `request_ids` their ids."""
        out, overhead = [], self.model_overhead_s(batch_size)
        tokens = self.batch_tokens(budgets, request_ids)
        share = self.ar_round_share(batch_size, budgets)
        for b in self.sizes:
            seconds = self.measured_seconds(b, batch_size)
            if seconds is None:
                seconds = self.passes(b) * self.cost.cost(batch_size * self.query_tokens(b)) + overhead
            if b == self.AR_KEY and share < 1.0:
                seconds = overhead + max(seconds - overhead, 0.0) * share
            out.append((b, batch_size * tokens[b] / max(seconds, 1e-9)))
        return out

    def measured_seconds(self, key, batch_size: int) -> Optional[float]:
        """Seconds of a round of `key` for `batch_size` requests from its measured periods, or
        None while the batch size's bucket has not run it `PERIOD_TIMINGS` times. Between the
        measured batch sizes a round's time is interpolated linearly in the batch size (a fixed
        part plus a part per request); interpolating the per-request period in log2 of the batch
        size instead rated a round of 12 requests between measured rounds of 4 and 16 well above
        its cost, and AR steps lost to 2-token blocks that ran slower (docs/perf-real.md). Beyond them: proportional (the
        per-request period of the nearest). Only buckets timed `PERIOD_TIMINGS` times are read:
        one round's figure can be an outlier."""
        table = self.period.get(key)
        if table is None or not table.known(batch_size, PERIOD_TIMINGS):
            return None
        points = sorted((2 ** b, 2 ** b * per) for b, per in table.seconds.items()
                        if table.timings.get(b, 0) >= PERIOD_TIMINGS)
        if batch_size <= points[0][0]:
            return batch_size * points[0][1] / points[0][0]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if batch_size <= n1:
                return t0 + (t1 - t0) * (batch_size - n0) / (n1 - n0)
        return batch_size * points[-1][1] / points[-1][0]

    def steps_worth_a_round(self, batch_size: int) -> Optional[int]:
        """The fewest AR steps left in a round for which ending it when a request arrives pays
        (None: none within a round). Left running, the round keeps the arrival out for those
        steps with its batch slot empty, a loss of steps · cost(bs) / bs of the batch's time
        where a forward costs about the same with one request less; ended, the batch pays one
        more round's overhead. Where a step costs many rounds' overhead (SmolLM2 on a CPU) one
        step left pays; where a step costs about a round's overhead (the bundled model) it never
        does: at high concurrency arrivals would end every round after one step and pay the
        overhead per token that AR steps exist to spread (docs/perf.md, runs R1-R2)."""
        step = self.cost.cost(batch_size)
        if not step:
            return 1
        steps = max(1, math.ceil(self.overhead_s(batch_size) * batch_size / step))
        return steps if steps < self.ar_steps else None

    def ar_round_share(self, batch_size: int, budgets: Optional[Sequence[int]]) -> float:
        """The share of a whole B = 1 round's steps (outside its overhead) that this batch's
        round will run: a request leaves the round at its budget and each step forwards the
        requests still in it, so with budgets under `ar_steps` the round is shorter and its
        later steps narrower. Priced as a whole round, AR steps lost every request's last
        rounds to 2-token blocks on a model where blocks never pay (SmolLM2 on a CPU; at
        concurrency 16 requests of one length end together, whole batches with a step or two
        left)."""
        if not budgets or min(budgets) >= self.ar_steps:
            return 1.0
        full = self.cost.cost(batch_size) or 1e-9
        steps = [sum(r > j for r in budgets) for j in range(self.ar_steps)]
        return sum(self.cost.cost(n) / full for n in steps if n) / self.ar_steps

    def choose(self, batch_size: int, budgets: Optional[Sequence[int]] = None,
               request_ids: Optional[Sequence] = None) -> Choice:
        self.rounds += 1
        batch_size = max(batch_size, 1)
        limit = self.cost.bucket(max(self.query_tokens(b) for b in self.sizes))
        for b in sorted(self.sizes, reverse=True):  # start-up sweep: time every B once
            n = batch_size * self.query_tokens(b)
            if not self.cost.known(n) and self.cost.bucket(n) <= limit:
                return self._choice(b, batch_size, "sweep")
        rates = self.rates(batch_size, budgets, request_ids)
        best = max(rates, key=lambda r: r[1])[0]
        reason = "policy"
        if self.rounds % EXPLORE_EVERY == 0 and len(self.sizes) > 1:
            # Keep every other B measured, in turn from the largest down: larger blocks for the
            # acceptance of late drafts (the largest measures every k at once), smaller ones for
            # their round period at this batch size, which would otherwise stay at whatever
            # an unlucky round once measured. Not a B rated under EXPLORE_FLOOR of the best:
            # an estimate that far off is not a warm timing's noise, and such a round costs
            # (a 32-token block at batch 32 took 0.5 s, four AR-step rounds' time).
            best_rate = max(r for _, r in rates)
            others = sorted((b for b, r in rates if b != best and r >= EXPLORE_FLOOR * best_rate),
                            reverse=True)
            if not others and best == self.AR_KEY:
                # Every block rated far below AR steps, which observe no drafts: without a
                # block now and then the acceptance would never be measured again (a fresh
                # server whose warm-up request rejected every draft stayed at B = 1 for ~200
                # rounds). The runner-up, the cheapest mistake, keeps it measured.
                others = [max((r, b) for b, r in rates if b != best)[1]]
            if others:
                best = others[(self.rounds // EXPLORE_EVERY - 1) % len(others)]
                reason = "explore"
        return self._choice(best, batch_size, reason, tuple((b, round(r, 1)) for b, r in rates),
                            round(1e3 * self.model_overhead_s(batch_size), 2))

    def _choice(self, key, batch_size: int, reason: str, rates: tuple = (),
                overhead_ms: Optional[float] = None) -> Choice:
        block_size, groups = self.split(key)
        return Choice(block_size, batch_size, reason, rates, overhead_ms, groups)

    def observe_forward(self, query_tokens: int, seconds: float) -> None:
        self.cost.observe(query_tokens, seconds)
        if self.current is not None:
            self.current.forward_seconds += seconds
            self.current.forwards += 1

    def start_round(self, requests: frozenset, key, now: Optional[float] = None) -> None:
        """A block round begins. If it continues requests of the previous round with no prefill
        step in between, the time since that round began was that round's period, and less its
        forwards its overhead. (Other gaps hold idle time or another request's prefill.)"""
        now = time.perf_counter() if now is None else now
        last = self.current
        # A B = 1 round cut short (every request reached its budget or a stop before its last
        # step) is not what a B = 1 round costs: `rates` prices the steps a round will take.
        # (A round fed without its forwards' timings is taken as whole.)
        short = last is not None and last.key == self.AR_KEY and 0 < last.forwards < self.ar_steps
        if last is not None and not last.other_work and not short and last.requests & requests:
            period = now - last.started
            overhead = period - last.forward_seconds
            if 0.0 <= overhead <= 4 * last.forward_seconds + 0.05:  # not a stall of the process
                bs = len(last.requests)
                self.overhead.observe(bs, overhead)
                self.overhead_by_block.setdefault(last.key, CostTable()).observe(bs, overhead)
                self.period.setdefault(last.key, CostTable()).observe(bs, period / bs)
        self.current = _Round(now, requests, key)

    def other_work(self) -> None:
        """A prefill step ran: the gap to the next round is not a round's overhead."""
        if self.current is not None:
            self.current.other_work = True

    def observe_ar_round(self, request_ids: Sequence) -> None:
        """A B = 1 round (no drafts): its requests' own acceptance fades towards the server's,
        so a request rated down to B = 1 by a few rejected blocks is offered blocks again (it
        would otherwise never be re-measured: AR steps observe no drafts)."""
        for rid in request_ids:
            for requests in self.request_stats():
                own = requests.get(rid)
                if own is not None:
                    own.fade()

    def request_stats(self) -> tuple:
        """Every per-request acceptance table (one per kind of drafted round)."""
        return (self.requests,)

    def observe_round(self, block_size: int, accepted: Sequence[int],
                      request_ids: Optional[Sequence] = None, groups: Optional[int] = None) -> None:
        """`accepted`: per request, drafts accepted (None: the request had no drafts this round,
        e.g. a quadratic round after a sparse round that drafted none: nothing observed)."""
        if block_size <= 1:
            return
        if request_ids is not None and len(request_ids) == len(accepted):
            pairs = [(rid, a) for rid, a in zip(request_ids, accepted) if a is not None]
            request_ids, accepted = [rid for rid, _ in pairs], [a for _, a in pairs]
        else:
            accepted, request_ids = [a for a in accepted if a is not None], None
        if not accepted:
            return
        server, requests = self.stats(groups)
        server.observe(block_size, accepted)
        if request_ids is None:
            return
        if len(requests) > MAX_TRACKED:  # finished requests: keep only this round's
            keep = set(request_ids)
            for rid in [rid for rid in requests if rid not in keep]:
                del requests[rid]
        for rid, a in zip(request_ids, accepted):
            own = requests.get(rid)
            if own is None:
                own = requests[rid] = Acceptance(self.max_block, decay=REQUEST_DECAY)
            own.observe(block_size, [a])


def _own_sums(own: Optional[Acceptance], server) -> list:
    if own is None:
        return server[1]
    return _prefix_sums(own.at_least(own.rates(server[0], REQUEST_WEIGHT)))


def _prefix_sums(values: Sequence[float]) -> list:
    """sums[k] = values[0] + ... + values[k-1] (sums[0] = 0)."""
    sums, total = [0.0], 0.0
    for v in values:
        total += v
        sums.append(total)
    return sums


class RoundBlockSize:
    """The scheduler-side state: the shape of the round being formed, chosen from the settings
    (fixed, cycle or policy). (Room to the context end needs no cap: a request finishes once a
    round of the largest shape would not fit, as in stock SGLang.)

    `quadratic`: the quadratic mode's layout (patches/dllm_config.py): the fixed round's under a
    fixed block_size, the largest candidate's under `auto`, whose policy then chooses among AR
    steps and quadratic (b, groups) rounds (quadratic_policy.py)."""

    def __init__(self, settings, max_block: int, mode: str, quadratic=None):
        from sglang_nemodiff.quadratic_policy import QuadraticPolicy
        from sglang_nemodiff.settings import BLOCK_SIZES

        self.max_block = max_block
        self.quadratic = quadratic
        auto = settings.block_size == "auto" and mode in ("linearspec", "quadratic")
        self.fixed = None if auto else max_block
        self.cycle = tuple(settings.block_size_cycle) if settings.block_size_cycle else None
        if mode == "quadratic":
            self.policy = QuadraticPolicy(max_block, BLOCK_SIZES, settings.ar_steps,
                                          shifted=bool(quadratic is not None and quadratic.shifted))
        else:
            self.policy = BlockSizePolicy(max_block, BLOCK_SIZES, settings.ar_steps)
        # Slots a B = 1 round places: its AR steps (algorithms/ar_steps.py; the modes that take
        # them: LinearSpec, quadratic under auto).
        self.ar_slots = self.policy.ar_steps if mode in ("linearspec", "quadratic") else 1
        self.cycle_index = 0
        self.last_choice: Optional[Choice] = None
        self.last_log = 0.0
        self.last_logged = None

    @property
    def timed(self) -> bool:
        """Whether the policy chooses B (then it learns from every round's record)."""
        return self.fixed is None and self.cycle is None

    def layout(self, block_size: int, groups: Optional[int] = None):
        """A quadratic round's layout: `groups` names one (dense: the block size); None: a
        LinearSpec/FastDiffuser block or AR steps."""
        if self.quadratic is None or groups is None or block_size == 1:
            return None
        if self.fixed is not None:
            return self.quadratic
        from sglang_nemodiff.quadratic_layout import QuadraticLayout

        return QuadraticLayout.for_checkpoint(block_size, self.quadratic.shifted,
                                              groups if groups < block_size else None)

    def slots(self, block_size: int, groups: Optional[int] = None) -> int:
        """Block slots a round of this shape places."""
        layout = self.layout(block_size, groups)
        if layout is not None:
            return layout.tokens
        return self.ar_slots if block_size == 1 else block_size

    def plan(self, block_size: int, groups: Optional[int] = None,
             batch_size: Optional[int] = None) -> RoundPlan:
        """The plan of a round of this shape (the one begin_round chose, or rank 0's) for
        `batch_size` requests."""
        yield_steps = 1
        if block_size == 1 and self.timed and batch_size:
            yield_steps = self.policy.steps_worth_a_round(batch_size)
        return RoundPlan(block_size=block_size, slots=self.slots(block_size, groups),
                         yield_steps_left=yield_steps,
                         timed=self.timed, layout=self.layout(block_size, groups))

    def observe(self, record: RoundRecord) -> None:
        """What a finished batch tells the policy (once per batch, scheduler side): a prefill
        batch is not a round (its time is not a round's overhead); a round's start (the period
        of the round before it), its forwards' timings and its acceptance."""
        policy = self.policy
        if record.prefill:
            policy.other_work()
            return
        policy.start_round(frozenset(record.request_ids), policy.key_of(record.block_size, record.groups),
                           now=record.started)
        for query_tokens, seconds in record.forward_times:
            policy.observe_forward(query_tokens, seconds)
        if record.block_size == 1:
            policy.observe_ar_round(record.request_ids)
        elif record.accepted is not None:
            policy.observe_round(record.block_size, record.accepted, record.request_ids, record.groups)

    def begin_round(self, batch_size: int, budgets: Optional[Sequence[int]] = None,
                    request_ids: Optional[Sequence] = None) -> Choice:
        """The shape of the round being formed for `batch_size` requests (`budgets`: the
        tokens each may still generate, `request_ids` their ids, when known)."""
        if self.cycle is not None:
            b = min(self.cycle[self.cycle_index % len(self.cycle)], self.max_block)
            self.cycle_index += 1
            choice = Choice(b, batch_size, "cycle")
        elif self.fixed is not None:
            groups = self.quadratic.n_groups if self.quadratic is not None else None
            choice = Choice(self.fixed, batch_size, "fixed", groups=groups)
        else:
            choice = self.policy.choose(batch_size, budgets, request_ids)
        self.last_choice = choice
        # Logged: the sweep, a policy choice that changes the shape, and one every 10 s (not
        # explorations).
        shape = (choice.block_size, choice.groups)
        changed = choice.reason == "policy" and shape != self.last_logged
        if choice.reason == "sweep" or changed or (
                choice.reason == "policy" and time.monotonic() - self.last_log >= 10.0):
            self.last_log = time.monotonic()
            self.last_logged = shape if choice.reason == "policy" else self.last_logged
            groups = "" if choice.groups is None else (
                f" (quadratic, {choice.groups} group{'s' if choice.groups > 1 else ''})")
            logger.info("[nemodiff] block size %d%s for batch %d (%s)%s", choice.block_size, groups,
                        batch_size, choice.reason, f"; expected tok/s by candidate: {dict(choice.rates)}, "
                        f"round overhead {choice.overhead_ms} ms" if choice.rates else "")
        return choice


def round_planner(manager, dllm_config) -> RoundBlockSize:
    """The scheduler's planner: one per DllmManager (one scheduler per process), created on the
    first round. Under tensor parallelism each rank has its own; rank 0's B is broadcast."""
    planner = getattr(manager, "nemodiff_rounds", None)
    if planner is None:
        from sglang_nemodiff.algorithms import mode_of
        from sglang_nemodiff.settings import AlgorithmSettings

        planner = RoundBlockSize(AlgorithmSettings.from_mapping(dllm_config.algorithm_config),
                                 dllm_config.block_size, mode_of(dllm_config.algorithm),
                                 getattr(dllm_config, "quadratic", None))  # patches/dllm_config.py
        manager.nemodiff_rounds = planner
    return planner
