"""`--tp 2` on CPU (gloo groups, patches/cpu_parallel_groups.py): the sharded model gives the same
tokens as the unsharded reference."""

import os

import pytest

from conftest import CPU_ARGS, SERVER_ENV, generate_many
from sglang_nemodiff.reference import ar_generate

pytestmark = pytest.mark.slow


def test_tp2_equals_reference(tiny_checkpoint, reference, prompts, tmp_path):
    from sglang_nemodiff.speedbench import ManagedServer

    # SGLang on CPU binds one rank per NUMA node unless told which cores each rank uses.
    env = {**os.environ, **SERVER_ENV, "SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
    server = ManagedServer(tiny_checkpoint, "ar", [*CPU_ARGS, "--tp", "2"],
                           log_path=str(tmp_path / "tp2.log"), env=env)
    with server:
        server.wait_ready(timeout=900)
        responses = generate_many(server, prompts[:4], 24)
    for ids, response in zip(prompts[:4], responses):
        assert response["output_ids"] == ar_generate(reference, ids, 24, eos_id=11).tokens
