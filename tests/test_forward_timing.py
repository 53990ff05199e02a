"""Forward timing for `block_size: auto` (algorithms/timing.py): host clock on CPU, CUDA events read
once per round on a GPU; no device synchronize per forward anywhere in the serving path."""

import pathlib
import re

import torch

from sglang_nemodiff.algorithms.timing import ForwardTimer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sglang_nemodiff"


def test_cpu_forwards_are_timed_at_once():
    timer, seen = ForwardTimer(), []
    started = timer.start(on_cuda=False)
    timer.stop(started, 16, lambda n, s: seen.append((n, s)))
    assert len(seen) == 1 and seen[0][0] == 16 and seen[0][1] >= 0
    timer.flush(lambda n, s: seen.append((n, s)))  # nothing queued on CPU
    assert len(seen) == 1


def test_no_device_synchronize_in_the_serving_path():
    """Outside the offline tools (training, benchmarks), no module of the package synchronizes
    the device: the one per-forward sync the policy had is gone (negative control: the pattern
    finds the call in a line that has it)."""
    pattern = re.compile(r"\.synchronize\(")
    assert pattern.search("torch.cuda.synchronize()")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("tools/", "reference/", "speedbench/")):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.strip().startswith("#"):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    # The timer's flush waits on an event the round's host copies have already passed.
    assert len(offenders) == 1 and offenders[0].startswith("algorithms/timing.py:"), offenders
    assert "end.synchronize()" in offenders[0]


def test_cuda_events_are_read_once_per_round():
    if not torch.cuda.is_available():
        import pytest

        pytest.skip("needs a CUDA device (run by launch/gpu_check.sh on a lent GPU)")
    timer, seen = ForwardTimer(), []
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(3):
        started = timer.start(on_cuda=True)
        x = x @ x
        timer.stop(started, 32, lambda n, s: seen.append((n, s)))
    assert seen == []  # nothing read until the round ends
    timer.flush(lambda n, s: seen.append((n, s)))
    assert len(seen) == 3 and all(s > 0 for _, s in seen)
