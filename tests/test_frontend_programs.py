"""SGLang's own frontend test programs (sglang.test.test_programs) against LinearSpec and
FastDiffuser servers: multi-turn chat, streaming, expert answer (temperature 0.7 / 0.1), select
(prompt scoring), regex and typed generation (constrained decoding), parallel forks.

These are the programs that do not need a capable model; AR mode passes the same list on the tiny
checkpoint (the JSON, ReAct, tool-use and few-shot programs expect a model that can write JSON or
answer questions; two others read attributes the RuntimeEndpoint does not have)."""

import pytest

pytestmark = pytest.mark.slow

PROGRAMS = {
    "select": lambda tp: tp.test_select(False),
    "mt_bench": lambda tp: tp.test_mt_bench(),
    "stream": lambda tp: tp.test_stream(),
    "expert_answer": lambda tp: tp.test_expert_answer(False),
    "parallel_decoding": lambda tp: tp.test_parallel_decoding(),
    "regex": lambda tp: tp.test_regex(),
    "dtype_gen": lambda tp: tp.test_dtype_gen(),
    "chat_completion_speculative": lambda tp: tp.test_chat_completion_speculative(),
}


@pytest.mark.parametrize("mode", ["linearspec", "fastdiffuser"])
def test_sglang_test_programs(server_pool, tiny_checkpoint, mode):
    import sglang as sgl
    from sglang.test import test_programs as tp

    server = server_pool.get(tiny_checkpoint, mode)
    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    failed = {}
    for name, run in PROGRAMS.items():
        try:
            run(tp)
        except Exception as exc:  # collect all, report together
            failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    assert not failed, failed
