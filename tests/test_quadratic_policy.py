"""The quadratic mode's policy (`--algorithm quadratic`, `block_size: auto`): its candidates and
their cost and yield, and its choices on synthetic cost tables and acceptance."""

import pytest

from sglang_nemodiff.block_policy import RoundBlockSize
from sglang_nemodiff.quadratic_layout import QuadraticLayout
from sglang_nemodiff.quadratic_policy import QuadraticPolicy, largest_auto_layout
from sglang_nemodiff.round_plan import RoundPlan, RoundRecord
from sglang_nemodiff.settings import BLOCK_SIZES, AlgorithmSettings


def test_candidates_shapes_and_keys():
    p = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)
    assert p.sizes[0] == p.AR_KEY and (16, 4) in p.sizes and (16, 2) in p.sizes and (8, 0) in p.sizes
    assert all(b <= 16 and 0 <= k <= min(b, 4) for b, k in p.sizes[1:]) and (32, 1) not in p.sizes
    assert (4, 4) in p.sizes and (16, 8) not in p.sizes and (16, 16) not in p.sizes  # AUTO_MAX_GROUPS
    assert p.query_tokens((16, 2)) == 16 + 2 * 16 and p.query_tokens((4, 4)) == 4 * 5
    assert QuadraticPolicy(16, BLOCK_SIZES, shifted=True).query_tokens((16, 2)) == 16 + 2 * 15
    assert p.query_tokens(p.AR_KEY) == 1 and p.passes(p.AR_KEY) == 4 and p.passes((8, 2)) == 1
    assert p.query_tokens((8, 0)) == 8 and p.passes((8, 0)) == 2  # a LinearSpec round
    for key in p.sizes:  # a round's record names the candidate it ran
        assert p.key_of(*p.split(key)) == key
    assert p.split((4, 4)) == (4, 4) and p.split((8, 2)) == (8, 2) and p.split((8, 0)) == (8, None)
    # The widest candidate is what the scheduler reserves for (patches/dllm_config.py).
    assert largest_auto_layout(16, False).tokens == max(p.query_tokens(k) for k in p.sizes) == 80


def test_expected_tokens_count_the_rounds_without_drafts():
    p = QuadraticPolicy(16, BLOCK_SIZES)
    every = [float(k) for k in range(17)]  # P(accepted >= k) = 1: every draft accepted
    none = [0.0] + [1.0] * 16  # P(accepted >= 1) = 0
    sums = {"quadratic": every, "linear": none}
    assert p.request_tokens((16, 16), sums, 1 << 30) == 16  # dense: always drafted
    # 2 groups: n = 16 > 2, so every other round has no drafts and commits one token
    assert p.request_tokens((16, 2), sums, 1 << 30) == pytest.approx((16 + 1) / 2)
    assert p.request_tokens((16, 0), sums, 1 << 30) == 1.0  # LinearSpec rounds: their own rates
    assert p.request_tokens((16, 1), {"quadratic": none}, 1 << 30) == 1.0  # n = 1: drafted again
    assert p.request_tokens((16, 16), sums, 5) == 5  # the budget caps it
    assert p.request_tokens(p.AR_KEY, sums, 2) == 1.0 * min(p.ar_steps, 2)


def _fill(p, cost, overhead=0.0005, batch=1):
    for key in p.sizes:
        for _ in range(3):
            p.observe_forward(batch * p.query_tokens(key), cost(batch * p.query_tokens(key)))
    p.overhead.observe(batch, overhead)


def test_choices_follow_cost_and_acceptance():
    """Flat forward cost (a GPU at small batch) and drafts that are accepted: the widest round
    (most groups) wins. A fixed cost plus one per token (this CPU): a sparse round with the
    same acceptance, AR steps when no draft is ever accepted (negative control: the same cost
    table, only the acceptance differs)."""
    accepting = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)
    _fill(accepting, lambda n: 0.01)
    for _ in range(200):
        accepting.observe_round(16, [15, 12, 14], groups=16)
        accepting.observe_round(16, [15, 12, 14])  # LinearSpec rounds: as good, two forwards
    choice = accepting.choose(1)
    assert (choice.block_size, choice.groups) == (16, 4), choice

    per_token = lambda n: 0.005 + 0.0001 * n  # noqa: E731
    sparse = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)
    _fill(sparse, per_token)
    for _ in range(200):
        sparse.observe_round(16, [15, 12, 14], groups=16)
    best = sparse.choose(1)
    assert best.block_size > 1 and best.groups is not None and best.groups < best.block_size, best

    rejecting = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)
    _fill(rejecting, per_token)
    for _ in range(200):
        rejecting.observe_round(16, [0, 0, 0], groups=16)
        rejecting.observe_round(16, [0, 0, 0])
    assert rejecting.choose(1).block_size == 1

    linear = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)  # LinearSpec's drafts only accepted
    _fill(linear, per_token)
    for _ in range(200):
        linear.observe_round(16, [0, 0, 0], groups=16)
        linear.observe_round(16, [15, 12, 14])
    best = linear.choose(1)
    assert best.block_size > 1 and best.groups is None, best


def test_rounds_without_drafts_observe_nothing():
    p = QuadraticPolicy(16, BLOCK_SIZES)
    before = p.acceptance.rates()
    p.observe_round(16, [None, None], request_ids=["a", "b"], groups=2)
    assert p.acceptance.rates() == before and not p.requests
    p.observe_round(16, [None, 3], request_ids=["a", "b"], groups=2)
    assert set(p.requests) == {"b"} and p.acceptance.reached[1] == 1
    assert not p.linear_requests and p.linear.reached[1] == 0  # a quadratic round's


def test_round_state_plans_quadratic_shapes():
    auto = RoundBlockSize(AlgorithmSettings(ar_steps=4), 16, "quadratic", largest_auto_layout(16, False))
    assert auto.timed and isinstance(auto.policy, QuadraticPolicy)
    assert auto.plan(1) == RoundPlan(block_size=1, slots=4, timed=True)  # AR steps
    assert auto.plan(8, 2) == RoundPlan(8, 8 + 2 * 8, True, QuadraticLayout(8, 8, 2, False))
    assert auto.plan(16, 16).layout == QuadraticLayout.for_checkpoint(16, False) and auto.plan(16, 16).slots == 272
    assert auto.plan(16) == RoundPlan(block_size=16, slots=16, timed=True)  # a LinearSpec round
    sparse = QuadraticLayout.for_checkpoint(16, False, 2)
    fixed = RoundBlockSize(AlgorithmSettings(block_size=16, quadratic_groups=2), 16, "quadratic", sparse)
    choice = fixed.begin_round(3)
    assert not fixed.timed and (choice.block_size, choice.groups) == (16, 2)
    assert fixed.plan(choice.block_size, choice.groups).layout == sparse
    # A round's record reaches the right candidate's period table.
    auto.observe(RoundRecord(0.0, ("a",), 16, ((48, 0.01),), (3,), groups=2))
    auto.observe(RoundRecord(0.02, ("a",), 8, ((8, 0.01), (8, 0.01)), (5,)))  # LinearSpec B = 8
    auto.observe(RoundRecord(0.05, ("a",), 8, ((24, 0.01),), (None,), groups=2))
    assert set(auto.policy.period) == {(16, 2), (8, 0)}
    assert auto.policy.acceptance.did[3] == 1 and auto.policy.linear.did[5] == 1


def test_an_explored_quadratic_round_runs_twice_from_another_kind():
    """Its first round after AR steps or a LinearSpec round has no drafts (observes nothing):
    the exploration repeats it once, so its acceptance is measured; then the policy goes back."""
    from sglang_nemodiff.block_policy import EXPLORE_EVERY

    p = QuadraticPolicy(16, BLOCK_SIZES, ar_steps=4)
    _fill(p, lambda n: 0.005 + 0.0001 * n)
    for _ in range(200):
        p.observe_round(16, [0, 0, 0], groups=4)  # quadratic drafts rejected
        p.observe_round(16, [2, 3, 1])  # LinearSpec's accepted now and then
    keys = []
    for _ in range(6 * EXPLORE_EVERY):
        c = p.choose(1)
        keys.append((p.key_of(c.block_size, c.groups), c.reason))
    incumbent = keys[0][0]
    assert not p.is_quadratic(incumbent)
    for i, (key, reason) in enumerate(keys[:-2]):
        if reason == "explore" and p.is_quadratic(key) and not p.is_quadratic(keys[i - 1][0]):
            assert keys[i + 1] == (key, "explore"), keys[i - 1:i + 3]
            assert keys[i + 2][1] != "explore"
    assert sum(reason == "explore" and p.is_quadratic(key) for key, reason in keys[:-2]) >= 2
