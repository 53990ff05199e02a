"""The block-size policy (`block_size: auto`) on synthetic cost tables and acceptance, without a
server: it picks B = 1 when a forward's cost grows linearly with its tokens, the largest block
when forwards cost the same whatever their size, and follows the acceptance it observes."""

import pytest

from sglang_nemodiff.block_policy import EXPLORE_EVERY, Acceptance, BlockSizePolicy, CostTable, RoundBlockSize
from sglang_nemodiff.settings import BLOCK_SIZES, AlgorithmSettings, load_settings, max_block_size


def policy(cost, accepted, rounds=200, max_block=32):
    p = BlockSizePolicy(max_block, BLOCK_SIZES)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
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
    t.observe(4, 4.0)  # refreshed online (moving average)
    assert 2.0 < t.cost(4) < 4.0


def test_start_up_sweep_then_policy_then_exploration():
    p = BlockSizePolicy(32, BLOCK_SIZES)
    swept = []
    for _ in BLOCK_SIZES:
        choice = p.choose(1)
        assert choice.reason == "sweep"
        swept.append(choice.block_size)
        p.observe_forward(choice.block_size, 0.01 * choice.block_size)
    assert sorted(swept) == list(BLOCK_SIZES)
    choices = [p.choose(1) for _ in range(4 * EXPLORE_EVERY)]
    explored = [c.block_size for c in choices if c.reason == "explore"]
    assert len(explored) == 4 and {c.reason for c in choices} == {"policy", "explore"}
    assert 32 in explored  # the largest block is explored too, not only the next size up


def test_round_state_fixed_cycle_and_modes():
    auto = AlgorithmSettings()
    assert RoundBlockSize(auto, 32, "fastdiffuser").begin_round(4) == 32  # FastDiffuser: fixed
    assert RoundBlockSize(AlgorithmSettings(block_size=16), 16, "linearspec").begin_round(4) == 16
    cycled = RoundBlockSize(AlgorithmSettings(block_size_cycle=(32, 1, 4)), 32, "linearspec")
    assert [cycled.begin_round(2) for _ in range(4)] == [32, 1, 4, 32]


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
