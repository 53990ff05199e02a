"""The block-size policy (`block_size: auto`) on synthetic cost tables and acceptance, without a
server: it picks B = 1 when a forward's cost grows linearly with its tokens, the largest block
when forwards cost the same whatever their size, and follows the acceptance it observes."""

import pytest

from sglang_nemodiff.block_policy import EXPLORE_EVERY, EXPLORE_FLOOR, WARM_TIMINGS, Acceptance, BlockSizePolicy, CostTable, RoundBlockSize
from sglang_nemodiff.settings import BLOCK_SIZES, AlgorithmSettings, load_settings, max_block_size


def policy(cost, accepted, rounds=200, max_block=32):
    p = BlockSizePolicy(max_block, BLOCK_SIZES)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for _ in range(WARM_TIMINGS):
            p.observe_forward(n, cost(n))
    for _ in range(rounds):
        p.observe_round(max_block, accepted)
    p.rounds = 1  # not an exploration round
    return p


def test_linear_cost_picks_ar_whatever_the_acceptance():
    p = policy(lambda n: 1e-3 * n, [31, 31, 31, 31])
    assert p.choose(1).block_size == 1 and p.choose(8).block_size == 1


def test_flat_cost_picks_the_largest_block_when_drafts_are_accepted():
    p = policy(lambda n: 0.01, [31, 20, 12, 31])
    choice = p.choose(1)
    assert choice.block_size == 32 and choice.reason == "policy"
    rates = dict(choice.rates)
    assert rates[32] > rates[16] > rates[1]


def test_flat_cost_but_nothing_accepted_is_ar():
    # Two passes for one token: B = 1 does the same work in one.
    assert policy(lambda n: 0.01, [0, 0, 0]).choose(1).block_size == 1


def test_crossover_with_batch_size():
    """Flat up to 64 tokens, linear beyond (a device that saturates): large blocks at batch 1,
    smaller ones as the batch grows."""
    p = policy(lambda n: 0.01 * max(1.0, n / 64), [31, 15, 7, 31])
    small, large = p.choose(1).block_size, p.choose(32).block_size
    assert small == 32 and large < small


def test_acceptance_is_a_prefix_statistic():
    a = Acceptance(32)
    for _ in range(100):
        a.observe(32, [0, 3, 8, 31])
    probs = a.at_least()
    assert probs[0] == 1.0 and probs == sorted(probs, reverse=True)
    assert probs[1] == pytest.approx(0.75, abs=0.02) and probs[4] == pytest.approx(0.5, abs=0.02)
    assert a.expected_tokens(1) == 1.0
    # A block of B can commit at most B tokens: E grows with B, by less each time.
    e = [a.expected_tokens(b) for b in BLOCK_SIZES]
    assert e == sorted(e) and e[-1] <= 32


def test_acceptance_of_fully_accepted_blocks_carries_to_larger_blocks():
    """Blocks of 16 that accept all 15 drafts are censored there, not failures: the continuation
    rate they show carries on, so a 32-token block is expected to commit more (product-limit
    estimate). Blocks that stop early keep larger blocks unattractive."""
    full, stopping = Acceptance(32), Acceptance(32)
    for _ in range(50):
        full.observe(16, [15])
        stopping.observe(16, [2])
    assert full.at_least()[24] > 0.8 and full.expected_tokens(32) > 1.5 * full.expected_tokens(16)
    assert stopping.at_least()[4] < 0.05
    assert stopping.expected_tokens(32) < stopping.expected_tokens(16) + 0.1


def test_cost_table_interpolates_and_extrapolates():
    t = CostTable()
    t.observe(1, 1.0)
    t.observe(4, 2.0)
    assert t.cost(1) == 1.0 and t.cost(4) == 2.0 and t.cost(2) == pytest.approx(1.5)
    assert t.cost(8) == pytest.approx(2.0 + (2.0 - 1.0) / 3 * 4)  # the last slope, linear in n
    t.observe(4, 4.0)  # still warming up: a bucket's first timings keep their minimum
    assert t.cost(4) == 2.0 and not t.known(4)
    t.observe(4, 3.0)
    assert t.known(4)
    t.observe(4, 4.0)  # then refreshed online (moving average)
    assert 2.0 < t.cost(4) < 4.0


def test_cost_past_the_table_is_not_flat_when_only_the_last_two_timings_are_level():
    """A CPU forward of 128 tokens timed no cheaper than one of 64 (noise, or a moving average
    behind) made every larger forward look as cheap, so a 16-token block at batch 14 (224
    tokens) was rated free and ran. Past the table the slope is at least the whole table's;
    where the whole table is flat (a GPU) it stays flat."""
    t = CostTable()
    for n, seconds in ((16, 1.0), (64, 2.0), (128, 2.0)):
        t.observe(n, seconds)
    assert t.cost(256) == pytest.approx(2.0 + (2.0 - 1.0) / (128 - 16) * 128)
    flat = CostTable()
    for n in (16, 64, 128):
        flat.observe(n, 1.0)
    assert flat.cost(4096) == pytest.approx(1.0)


def test_a_cold_first_timing_does_not_stick():
    """The first forward of a shape pays one-time costs (allocation, a first kernel call): the
    sweep repeats each B until it is timed warm, so a cold figure cannot keep B = 32 unchosen
    (it would then never be re-timed). Here the first draft pass of each B > 1 is 20x slow,
    as on CPU where causal shapes are warm from the prefills and the draft pass is not."""
    p = BlockSizePolicy(32, BLOCK_SIZES)
    seen = set()
    while (choice := p.choose(1)).reason == "sweep":
        b = choice.block_size
        warm = 0.01 * (1 + b / 64)
        if b > 1:  # the draft pass
            p.observe_forward(b, warm * (20.0 if b not in seen else 1.0))
        p.observe_forward(b, warm)  # the causal pass
        p.observe_round(b, [b - 1])
        seen.add(b)
    assert seen == set(BLOCK_SIZES) and choice.block_size == 32


def test_round_overhead_is_the_period_between_rounds_less_the_forwards():
    p = BlockSizePolicy(32, BLOCK_SIZES)
    a, b = frozenset({"a"}), frozenset({"a", "b"})
    now = 0.0
    for _ in range(5):  # rounds of request a: 10 ms of forwards, 4 ms around them
        p.start_round(a, 32, now=now)
        p.observe_forward(32, 0.005)
        p.observe_forward(32, 0.005)
        now += 0.014
    p.start_round(a, 32, now=now)
    assert p.overhead_s(1) == pytest.approx(0.004)
    p.other_work()  # a prefill step in between: not a round's overhead
    p.start_round(b, 32, now=now + 0.5)
    p.start_round(frozenset({"c"}), 32, now=now + 0.6)  # no request continues: idle time
    assert p.overhead_s(1) == pytest.approx(0.004) and not p.overhead.known(2)


def test_round_overhead_makes_large_blocks_pay_at_small_batches():
    """A forward cost linear in tokens picks B = 1; a fixed cost per round that dwarfs the
    forwards amortises over a block's tokens and makes a well-accepted large block worth it."""
    p = policy(lambda n: 1e-4 * n, [31, 31, 31, 31])
    assert p.choose(1).block_size == 1
    for _ in range(5):
        p.overhead.observe(1, 0.05)
    assert p.choose(1).block_size == 32


def test_start_up_sweep_then_policy_then_exploration():
    p = BlockSizePolicy(32, BLOCK_SIZES)
    swept = []
    while (choice := p.choose(1)).reason == "sweep":
        swept.append(choice.block_size)
        p.observe_forward(choice.block_size, 0.01 * choice.block_size ** 0.3)  # every B worth exploring
    assert sorted(set(swept)) == list(BLOCK_SIZES) and len(swept) <= 3 * len(BLOCK_SIZES)
    p.rounds -= 1  # that choice was the first after the sweep
    choices = [p.choose(1) for _ in range(4 * EXPLORE_EVERY)]
    explored = [c.block_size for c in choices if c.reason == "explore"]
    assert len(explored) == 4 and {c.reason for c in choices} == {"policy", "explore"}
    assert 32 in explored  # the largest block is explored too, not only the next size up


def test_round_state_fixed_cycle_and_modes():
    auto = AlgorithmSettings()
    assert RoundBlockSize(auto, 32, "fastdiffuser").begin_round(4).block_size == 32  # FastDiffuser: fixed
    assert RoundBlockSize(AlgorithmSettings(block_size=16), 16, "linearspec").begin_round(4).block_size == 16
    cycled = RoundBlockSize(AlgorithmSettings(block_size_cycle=(32, 1, 4)), 32, "linearspec")
    assert [cycled.begin_round(2).block_size for _ in range(4)] == [32, 1, 4, 32]


def test_round_plans_are_decided_once_and_timed_only_under_auto():
    from sglang_nemodiff.round_plan import RoundPlan

    auto = RoundBlockSize(AlgorithmSettings(ar_steps=4), 32, "linearspec")
    assert auto.timed and auto.plan(1) == RoundPlan(block_size=1, slots=4, timed=True) and auto.plan(1).ar_steps
    assert auto.plan(16) == RoundPlan(block_size=16, slots=16, timed=True) and not auto.plan(16).ar_steps
    for fixed in (RoundBlockSize(AlgorithmSettings(block_size=16), 16, "linearspec"),
                  RoundBlockSize(AlgorithmSettings(), 32, "fastdiffuser"),
                  RoundBlockSize(AlgorithmSettings(block_size_cycle=(32, 1)), 32, "linearspec")):
        assert not fixed.timed and not fixed.plan(fixed.begin_round(2).block_size).timed


def test_round_records_feed_the_policy_as_direct_calls_do():
    """The scheduler folds each round's record into the policy (RoundBlockSize.observe): the
    same statistics as calling the policy's observers in the round's order."""
    from sglang_nemodiff.round_plan import RoundRecord

    rounds = [RoundRecord(0.00, ("a", "b"), 8, ((16, 0.010), (16, 0.011)), (3, 7)),
              RoundRecord(0.03, ("a", "b"), 8, ((16, 0.012), (16, 0.010)), (0, 7)),
              RoundRecord(0.0, ()),  # a prefill batch ran: the next gap is not a round's
              RoundRecord(0.09, ("a", "b", "c"), 1, ((3, 0.004),) * 4),
              RoundRecord(0.11, ("a", "b", "c"), 1, ((3, 0.004),) * 4),
              RoundRecord(0.13, ("a", "b", "c"), 4, ((12, 0.006), (12, 0.006)), (3, 1, 2))]
    folded = RoundBlockSize(AlgorithmSettings(ar_steps=4), 32, "linearspec")
    for record in rounds:
        folded.observe(record)
    direct = BlockSizePolicy(32, BLOCK_SIZES, 4)
    for r in rounds:
        if r.prefill:
            direct.other_work()
            continue
        direct.start_round(frozenset(r.request_ids), r.block_size, now=r.started)
        for n, sec in r.forward_times:
            direct.observe_forward(n, sec)
        if r.block_size == 1:
            direct.observe_ar_round(r.request_ids)
        else:
            direct.observe_round(r.block_size, r.accepted, r.request_ids)
    a, b = folded.policy, direct
    assert a.rates(3, [50, 50, 50], ["a", "b", "c"]) == b.rates(3, [50, 50, 50], ["a", "b", "c"])
    assert a.acceptance.rates() == b.acceptance.rates() and a.acceptance.rates()
    assert a.period.keys() == b.period.keys() == {8, 1}  # the prefill gap measured no period
    assert a.overhead.cost(2) == b.overhead.cost(2) is not None


def test_no_forward_is_timed_at_a_fixed_block_size():
    """Timing is for the policy's cost table only: an untimed plan starts no timer (on a GPU a
    timed forward records CUDA events); a timed one times every forward once."""
    from types import SimpleNamespace

    import torch

    from sglang_nemodiff.algorithms.base import NLDBlockAlgorithm

    class Timer:
        started = 0

        def start(self, on_cuda):
            Timer.started += 1
            return 0.0

        def stop(self, started, n, observe):
            observe(n, 0.001)

    algo = NLDBlockAlgorithm.__new__(NLDBlockAlgorithm)  # the pass helper alone, no SGLang config
    algo.timer = Timer()
    from sglang_nemodiff.model import PassOptions

    runner = SimpleNamespace(model=SimpleNamespace(pass_options=PassOptions()),
                             forward=lambda batch, pp_proxy_tensors=None: "out")
    batch = SimpleNamespace(input_ids=torch.zeros(8, dtype=torch.long))
    algo._forward_times = None  # a fixed plan
    assert algo.forward_pass(runner, batch, causal=True) == "out" and Timer.started == 0
    algo._forward_times = []  # a timed plan
    algo.forward_pass(runner, batch, causal=False, draft_lora=True)
    assert Timer.started == 1 and algo._forward_times == [(8, 0.001)]
    assert runner.model.pass_options.kind is None  # cleared after the pass


def test_settings_block_size(tmp_path):
    (tmp_path / "c.yaml").write_text("block_size: 16\n")
    settings = load_settings(str(tmp_path / "c.yaml"))
    assert max_block_size(settings, 32, "c") == 16 and max_block_size(AlgorithmSettings(), 32, "c") == 32
    with pytest.raises(ValueError, match="exceeds the checkpoint"):
        max_block_size(AlgorithmSettings(block_size=64), 32, "c")
    for bad in ("block_size: 1\n", "block_size: fast\n", "block_size_cycle: [0]\n"):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ValueError, match="block_size"):
            load_settings(str(tmp_path / "bad.yaml"))


def test_measured_round_period_replaces_the_model():
    """Work outside the forwards that grows with B is invisible to the forward-cost model, which
    then over-rates large blocks; once a (batch size, B) pair has run, its measured period
    decides. The model stays optimistic for pairs not yet run, so they get tried."""
    p = policy(lambda n: 1e-4 * max(n, 64), [7, 7, 7, 7])  # flat to 64 tokens: B = 8 looks free
    assert p.choose(8).block_size == 8
    now, batch = 0.0, frozenset(range(8))
    for b, period in ((8, 0.04), (8, 0.04), (8, 0.04), (1, 0.004), (1, 0.004), (1, 0.004)):
        p.start_round(batch, b, now=now)
        now += period
    p.start_round(batch, 1, now=now)
    rates = dict(p.choose(8).rates)
    assert rates[8] == pytest.approx(8 * 8 / 0.04, rel=0.01) and rates[1] == pytest.approx(8 / 0.004)
    assert rates[8] < rates[1] and p.choose(8).block_size != 8
    # Not run at this batch size yet: rated by the model, whose overhead is now the measured one.
    model = dict(policy(lambda n: 1e-4 * max(n, 64), [7, 7, 7, 7]).rates(8))
    assert rates[16] != model[16]


def test_measured_periods_interpolate_per_round_linearly_in_the_batch_size():
    """Rounds of AR steps measured at batches of 2 and 16 (a round's time: a fixed part plus a
    part per request, 0.2 + 0.04 bs seconds): a batch of 12 is rated at that line's 0.68 s.
    Interpolated per request in log2 of the batch size it was rated 0.78 s, ~14% dear (on
    SmolLM2, ~30% with the buckets measured there), and 2-token blocks that ran slower won.
    A bucket timed once (an outlier round) is not read; beyond the measured batch sizes the
    nearest per-request period scales."""
    p = policy(lambda n: 1e-3 * n, [0, 0, 0, 0])
    table = p.period.setdefault(1, CostTable())
    for bs in (2, 16):
        for _ in range(WARM_TIMINGS):
            table.observe(bs, (0.2 + 0.04 * bs) / bs)
    table.observe(4, 0.5)  # one round, far off the line
    assert p.measured_seconds(1, 12) == pytest.approx(0.2 + 0.04 * 12)
    assert dict(p.rates(12))[1] == pytest.approx(12 / (0.2 + 0.04 * 12))
    assert p.measured_seconds(1, 20) == pytest.approx(20 * (0.2 + 0.04 * 16) / 16)
    assert p.measured_seconds(1, 6) is None  # its bucket (8) not measured: the model rates it
    assert p.measured_seconds(2, 12) is None


def test_exploration_visits_every_other_size_smaller_ones_too(monkeypatch):
    """A smaller B's period at this batch size must be re-measured too: one unlucky round would
    otherwise keep it unchosen for good (every B rated within the floor; here the floor is 0)."""
    import sglang_nemodiff.block_policy as bp

    monkeypatch.setattr(bp, "EXPLORE_FLOOR", 0.0)
    p = policy(lambda n: 0.01, [31, 31, 31, 31])  # flat cost: B = 32 is the best
    p.rounds = 0
    explored = [c.block_size for c in (p.choose(4) for _ in range(5 * EXPLORE_EVERY)) if c.reason == "explore"]
    assert explored == [16, 8, 4, 2, 1]


def test_exploration_skips_sizes_rated_far_below_the_best():
    """Flat cost: B = 1 and 2 commit 1-2 tokens for the cost a 32-block commits 32 with; a
    round of them would only cost. Negative control: with the floor at 0 they are explored."""
    import sglang_nemodiff.block_policy as bp

    def explored():
        p = policy(lambda n: 0.01, [31, 31, 31, 31])
        p.rounds = 0
        return [c.block_size for c in (p.choose(4) for _ in range(5 * EXPLORE_EVERY)) if c.reason == "explore"]

    assert bp.EXPLORE_FLOOR == EXPLORE_FLOOR > 0
    assert 1 not in explored() and 2 not in explored() and 16 in explored()
    floor, bp.EXPLORE_FLOOR = bp.EXPLORE_FLOOR, 0.0
    try:
        assert explored() == [16, 8, 4, 2, 1]
    finally:
        bp.EXPLORE_FLOOR = floor


def test_untried_block_sizes_get_the_least_overhead_measured():
    """Overhead grows with B; the model charges an untried B the least overhead measured at
    this batch size (optimistic: it gets tried), not the average over the B's that ran."""
    p = policy(lambda n: 1e-3, [7, 7, 7, 7])
    batch, now = frozenset(range(8)), 0.0
    for b, overhead in ((8, 0.02), (8, 0.02), (8, 0.02), (4, 0.005), (4, 0.005), (4, 0.005)):
        p.start_round(batch, b, now=now)
        for _ in range(2):
            p.observe_forward(8 * b, 1e-3)
        now += 2e-3 + overhead
    p.start_round(batch, 4, now=now)
    assert p.model_overhead_s(8) == pytest.approx(0.005) and p.overhead_s(8) > 0.006
    rates = dict(p.rates(8))
    assert rates[1] == pytest.approx(8 / (1e-3 + 0.005), rel=0.01)


def test_budget_caps_the_tokens_a_block_is_credited():
    """A request with r tokens left takes at most r of a block (the rest is trimmed): a 32-block
    that accepts everything is worth 32 tokens to a request with 47 left and 3 to one with 3
    left, where a 4-block delivers the same 3 for less. Negative control: without budgets the
    policy keeps the 32-block."""
    p = policy(lambda n: 1e-3 * (8 + n / 8), [31, 31, 31, 31])
    assert p.choose(1, budgets=[47]).block_size == 32
    assert p.choose(1, budgets=[3]).block_size == 4
    assert p.choose(1).block_size == 32
    tokens = p.batch_tokens([3, 47])
    assert tokens[32] == pytest.approx((3 + p.tokens(32)) / 2, rel=0.01)
    assert tokens[1] == 1.0  # an AR-steps round of one step per round (ar_steps = 1 here)


def test_each_request_is_rated_by_its_own_recent_acceptance():
    """The server's blocks accept everything, but request "stuck" rejected its last drafts:
    for it a round of 32 would commit ~1 token, so it gets B = 1 alone; a request with no blocks
    of its own yet is rated by the server's acceptance. Negative control: without request ids
    the server's acceptance rates both alike."""
    p = policy(lambda n: 1e-3 * (8 + n / 8), [31, 31, 31, 31])
    for _ in range(4):
        p.observe_round(32, [31, 0], request_ids=["flowing", "stuck"])
    assert p.choose(1, budgets=[200], request_ids=["stuck"]).block_size == 1
    assert p.choose(1, budgets=[200], request_ids=["new"]).block_size == 32
    assert p.choose(1, budgets=[200], request_ids=["flowing"]).block_size == 32
    assert p.choose(1, budgets=[200]).block_size == 32
    mixed = p.batch_tokens([200, 200], ["stuck", "flowing"])
    assert mixed[32] == pytest.approx((p.batch_tokens([200], ["stuck"])[32]
                                       + p.batch_tokens([200], ["flowing"])[32]) / 2)
    assert p.batch_tokens([200], ["stuck"])[32] < 2.0 < 20.0 < p.batch_tokens([200], ["flowing"])[32]


def test_request_acceptance_follows_its_recent_blocks_and_is_bounded():
    """A request whose blocks start accepting again is rated up within a few blocks (its own
    statistics decay per block); finished requests are dropped once many are tracked."""
    import sglang_nemodiff.block_policy as bp

    p = policy(lambda n: 1e-3 * (8 + n / 8), [15, 15, 15, 15])
    for _ in range(5):
        p.observe_round(32, [0], request_ids=["r"])
    low = p.batch_tokens([200], ["r"])[16]
    for _ in range(4):
        p.observe_round(32, [31], request_ids=["r"])
    assert low < 2.0 and p.batch_tokens([200], ["r"])[16] > 10.0
    for i in range(bp.MAX_TRACKED + 10):
        p.observe_round(32, [3], request_ids=[f"q{i}"])
    assert len(p.requests) <= bp.MAX_TRACKED + 1


def test_a_request_rated_down_to_ar_steps_is_offered_blocks_again():
    """AR-step rounds observe no drafts, so a request rated down to B = 1 would stay there for
    good; each of its B = 1 rounds fades its own statistics towards the server's instead.
    Negative control: without the fading it stays at B = 1."""
    def stuck_policy():
        p = policy(lambda n: 1e-3 * (8 + n / 8), [31, 31, 31, 31])
        for _ in range(4):
            p.observe_round(32, [31, 0], request_ids=["flowing", "stuck"])
        return p

    p = stuck_policy()
    sizes = []
    for _ in range(12):
        sizes.append(p.choose(1, budgets=[200], request_ids=["stuck"]).block_size)
        if sizes[-1] == 1:
            p.observe_ar_round(["stuck"])
    assert sizes[0] == 1 and sizes[-1] > 1
    frozen = stuck_policy()
    assert all(frozen.choose(1, budgets=[200], request_ids=["stuck"]).block_size == 1 for _ in range(12))


def test_ar_steps_never_stop_measuring_the_acceptance():
    """Every block rated under the exploration floor of B = 1 (a fresh server whose first blocks
    rejected every draft): the runner-up is still explored, since AR steps observe no drafts
    and the acceptance would otherwise never be measured again."""
    p = policy(lambda n: 1e-3 * (8 + n / 8), [0, 0, 0, 0])
    p.rounds = 0
    choices = [p.choose(1) for _ in range(4 * EXPLORE_EVERY)]
    rates = dict(choices[0].rates)
    runner_up = max((r, b) for b, r in rates.items() if b != 1)[1]
    assert all(r < EXPLORE_FLOOR * rates[1] for b, r in rates.items() if b != 1)
    assert [c.block_size for c in choices if c.reason == "explore"] == [runner_up] * 4
    assert {c.block_size for c in choices if c.reason == "policy"} == {1}


def ar_step_policy(overhead=0.004, step=0.064, per_token=0.01):
    """AR steps of 4 per round; a forward costs `step` plus a little per query token (a small
    model on a CPU, as SmolLM2's: a 4-token forward costs 1.6 steps)."""
    p = BlockSizePolicy(32, BLOCK_SIZES, ar_steps=4)
    for n in (1, 2, 4, 8, 16, 32, 64):
        for _ in range(WARM_TIMINGS):
            p.observe_forward(n, step + per_token * n)
    for _ in range(50):
        p.observe_round(8, [1, 2, 1, 0])  # the first draft accepted three times in four, few after
    batch, now = frozenset({"a"}), 0.0
    for _ in range(WARM_TIMINGS + 1):  # full AR-step rounds: four forwards each
        p.start_round(batch, 1, now=now)
        for _ in range(4):
            p.observe_forward(1, step)
        now += 4 * step + overhead
    p.start_round(batch, 1, now=now)
    p.rounds = 1
    return p, now


def test_an_ar_steps_round_is_priced_at_the_steps_it_will_take():
    """A B = 1 round stops once its requests reach their budgets: with one token left it is one
    step, not four. Priced at a full round it lost every request's last rounds to 2-token
    blocks (the SmolLM2 sweep's log: B = 2 at batch 1 whenever the budget fell under 4)."""
    p, _ = ar_step_policy()
    full = 4 * 0.064 + 0.004
    assert p.choose(1, budgets=[40]).block_size == 1
    for budget in (1, 2, 3):
        rates = dict(p.choose(1, budgets=[budget]).rates)
        assert rates[1] == pytest.approx(budget / (0.004 + (full - 0.004) * budget / 4), rel=0.02)
        assert p.choose(1, budgets=[budget]).block_size == 1
        if budget < 3:  # negative control: at the full round's price, the 2-block would win
            assert budget / full < rates[2]
    # A batch's round runs to its longest budget; a request that left is not forwarded again.
    o, cost = p.model_overhead_s(2), p.cost.cost
    whole = 4 * cost(2) + o  # batch 2 has not run: the model
    assert dict(p.choose(2, budgets=[40, 40]).rates)[1] == pytest.approx(2 * 4 / whole, rel=0.01)
    share = (1 + 3 * cost(1) / cost(2)) / 4
    assert dict(p.choose(2, budgets=[1, 40]).rates)[1] == pytest.approx(
        2 * 2.5 / (o + (whole - o) * share), rel=0.01)


def test_a_cut_short_ar_steps_round_does_not_measure_the_period():
    """A B = 1 round that took fewer than its steps (budgets, stops) is not a B = 1 round's
    period; counted, its short period would make AR steps look cheaper than they are."""
    p, now = ar_step_policy()
    before = p.period[1].cost(1)
    batch = frozenset({"a"})
    for _ in range(5):
        p.observe_forward(1, 0.064)  # one step, then the round ended
        now += 0.064 + 0.004
        p.start_round(batch, 1, now=now)
    assert p.period[1].cost(1) == pytest.approx(before)
    # Negative control: full rounds do move it.
    for _ in range(5):
        for _ in range(4):
            p.observe_forward(1, 0.064)
        now += 4 * 0.064 + 0.04
        p.start_round(batch, 1, now=now)
    assert p.period[1].cost(1) > before * 1.05



def test_ending_ar_steps_at_an_arrival_pays_only_where_a_step_outweighs_a_round():
    """A request arriving during a round of AR steps waits out its remaining steps with its
    batch slot empty (steps · cost(bs) / bs of the batch's time); ending the round costs one
    round's overhead. A SmolLM2-like forward (170 ms at batch 16, 10 ms overhead) yields with one
    step left; a bundled-model-like one (8 ms at batch 32, 6 ms overhead) never does, nor at
    batch 4 (4 ms, 5 ms); a lone request does with 2 steps left. The plan carries it; a round
    the policy did not choose (a fixed cycle, tests) always yields."""
    def policy_with(step_s, overhead_s, bs):
        p = BlockSizePolicy(32, BLOCK_SIZES, ar_steps=4)
        for _ in range(WARM_TIMINGS):
            p.observe_forward(bs, step_s)
            p.overhead.observe(bs, overhead_s)
        return p

    assert policy_with(0.170, 0.010, 16).steps_worth_a_round(16) == 1
    assert policy_with(0.008, 0.006, 32).steps_worth_a_round(32) is None
    assert policy_with(0.004, 0.005, 4).steps_worth_a_round(4) is None
    assert policy_with(0.004, 0.006, 1).steps_worth_a_round(1) == 2
    auto = RoundBlockSize(AlgorithmSettings(), 32, "linearspec")
    for _ in range(WARM_TIMINGS):
        auto.policy.observe_forward(32, 0.008)
        auto.policy.overhead.observe(32, 0.006)
    assert auto.plan(1, batch_size=32).yield_steps_left is None
    assert auto.plan(1).yield_steps_left == 1
    cycle = RoundBlockSize(AlgorithmSettings(block_size_cycle=(1,)), 32, "linearspec")
    assert cycle.plan(1, batch_size=32).yield_steps_left == 1
