"""`sgl.Engine(...)` offline generation, with the plugin's `algorithm=` keyword."""

import pytest

from conftest import BLOCK32

from sglang_nemodiff.reference import ar_generate, linearspec_generate

pytestmark = pytest.mark.slow


def test_engine_linearspec_equals_reference(tiny_checkpoint, reference, prompts):
    import sglang as sgl

    engine = sgl.Engine(model_path=tiny_checkpoint, algorithm="linearspec", device="cpu",
                        attention_backend="torch_native", dtype="float32", max_total_tokens=4096,
                        algorithm_config=BLOCK32[1])
    try:
        outputs = engine.generate(input_ids=prompts[:4],
                                  sampling_params={"temperature": 0, "max_new_tokens": 24})
    finally:
        engine.shutdown()
    for ids, output in zip(prompts[:4], outputs):
        assert output["output_ids"] == ar_generate(reference, ids, 24, eos_id=11).tokens
        forwards = output["meta_info"]["nemodiff_forwards"]
        assert forwards[-1] == linearspec_generate(reference, ids, 24, 11).forwards
