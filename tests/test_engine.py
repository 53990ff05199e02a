"""`sgl.Engine(...)` offline generation, with the plugin's `algorithm=` keyword.

The Engine runs in a child process: its shutdown kills every child of the process that made it,
which in the test process would be the pooled servers of the other tests (restarted afterwards
at ~25 s each)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BLOCK32

from sglang_nemodiff.reference import ar_generate, linearspec_generate

pytestmark = pytest.mark.slow

ENGINE_SCRIPT = """
import json, sys
import sglang as sgl

checkpoint, config, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if __name__ == "__main__":
    engine = sgl.Engine(model_path=checkpoint, algorithm="linearspec", device="cpu",
                        attention_backend="torch_native", dtype="float32", max_total_tokens=4096,
                        algorithm_config=config)
    try:
        outputs = engine.generate(input_ids=prompts,
                                  sampling_params={"temperature": 0, "max_new_tokens": 24})
    finally:
        engine.shutdown()
    print("OUTPUTS " + json.dumps([[o["output_ids"], o["meta_info"]["nemodiff_forwards"]]
                                   for o in outputs]))
"""


def test_engine_linearspec_equals_reference(tiny_checkpoint, reference, prompts, tmp_path):
    script = tmp_path / "engine_run.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(script), tiny_checkpoint, BLOCK32[1],
                          json.dumps(prompts[:4])], capture_output=True, text=True, env=env,
                         timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("OUTPUTS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    outputs = json.loads(lines[-1][len("OUTPUTS "):])
    assert len(outputs) == 4
    for ids, (output_ids, forwards) in zip(prompts[:4], outputs):
        assert output_ids == ar_generate(reference, ids, 24, eos_id=11).tokens
        assert forwards[-1] == linearspec_generate(reference, ids, 24, 11).forwards
