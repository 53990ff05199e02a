"""`launch/gpu_check.sh --smoke`: the one-shot GPU check's steps on the CPU with tiny shapes, so
the script a lent GPU will run cannot rot (its numbers mean nothing here)."""

import os
import subprocess
import sys


def test_gpu_check_smoke(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "launch/gpu_check.sh", "--smoke"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| attention |" in report and "| confidence |" in report  # kernel benchmark rows
    for kind in ("verify", "draft", "quadratic"):
        assert f"| {kind} |" in report


def test_forward_bench_needs_torch_only():
    """A lent GPU has torch and Triton only: the forward benchmark builds its NLD-8B config and
    the reference model without transformers (here: blocked; shapes cut to a few layers)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['transformers'] = None; sys.argv = ['x', '--tokens', '2', "
            "'--context', '4', '--iters', '1']; sys.path.insert(0, 'launch'); "
            "import gpu_forward_bench as b; b.TORCH_ONLY_8B.update(num_hidden_layers=1, vocab_size=512, "
            "hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64); "
            "b.main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 2 | verify |" in result.stdout and "NLD-8B shapes" in result.stdout
