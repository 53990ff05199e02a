"""`--attention-backend nemodiff` through the real runtime: a LinearSpec server whose extend passes
(causal prefill, bidirectional draft, causal verify) run the Triton structured-attention kernel
under TRITON_INTERPRET=1 must produce the reference's AR tokens and the torch_native server's.
It runs graph-safe passes (`cuda_graphs: true`, model.py): the kernel reads each pass's kind
from the pass data tensor, the unmerged adapter is gated per row.

The interpreter is slow (~0.5 s per attention call), so the checkpoint is tiny (2 layers, 2 query
heads sharing 1 KV head: GQA and two layers of the KV pool are still exercised) and the prompts few
and short. The two servers start concurrently.

The in-process tests below compare `NemodiffAttnBackend.forward_extend` with torch_native's on a
scattered paged pool, for the PyTorch reference path (the CPU default) and, when the session runs
with TRITON_INTERPRET=1, the Triton path."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BLOCK32

GRAPH_SAFE32 = ("--algorithm-config",
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph_safe32.yaml"))

pytestmark = pytest.mark.slow

PROMPTS = [
    "def add(a, b):",
    "The quick brown fox",
    "Once upon a time, in a small village by the sea",  # 47 tokens: a prefix over 2 KV pages
]
MAX_NEW_TOKENS = 8  # the interpreter costs ~0.5 s per attention call
SERVER_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "2048",
               "--skip-server-warmup")
KERNEL_LOG_LINE = "extend passes run the Triton structured-attention kernel (TRITON_INTERPRET=1)"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _generate_all(server, prompts):
    import requests

    def one(ids):
        payload = {"input_ids": ids,
                   "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}}
        response = requests.post(server.url + "/generate", json=payload, timeout=600)
        response.raise_for_status()
        return response.json()["output_ids"]

    # Concurrently, so that requests with different prefix lengths share extend batches.
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_nemodiff_backend_matches_reference_and_torch_native(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from sglang_nemodiff.checkpoint import write_random_checkpoint
    from sglang_nemodiff.reference import NLDReference, ar_generate, linearspec_generate
    from sglang_nemodiff.servers import ManagedServer

    ckpt = write_random_checkpoint(str(tmp_path / "tiny"), seed=0, lora_rank=4,
                                   num_attention_heads=2, num_key_value_heads=1)
    # TRITON_INTERPRET=1 for the nemodiff server only (set before its processes import triton).
    envs = {"nemodiff": _env(TRITON_INTERPRET="1"), "torch_native": _env()}
    # The nemodiff server runs graph-safe passes (the kernel reads the pass kind from data).
    configs = {"nemodiff": GRAPH_SAFE32, "torch_native": BLOCK32}
    servers = {
        backend: ManagedServer(ckpt, "linearspec", [*SERVER_ARGS, *configs[backend],
                                                    "--attention-backend", backend],
                               log_path=str(tmp_path / f"{backend}.log"), env=env)
        for backend, env in envs.items()
    }
    try:
        for server in servers.values():
            server.start()

        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        prompts = [tokenizer(text).input_ids for text in PROMPTS]
        model = NLDReference.from_pretrained(ckpt)
        eos_id = model.config.eos_token_id
        with torch.no_grad():
            expected = [ar_generate(model, ids, MAX_NEW_TOKENS, eos_id=eos_id).tokens
                        for ids in prompts]
            spec = [linearspec_generate(model, ids, MAX_NEW_TOKENS, eos_id=eos_id).tokens
                    for ids in prompts]
        assert spec == expected  # the oracle's own LinearSpec == AR at temperature 0

        for server in servers.values():
            server.wait_ready(timeout=600)
        from sglang_nemodiff.model import GRAPH_SAFE_LOG_LINE

        with open(servers["nemodiff"].log_path) as f:
            log = f.read()
        assert KERNEL_LOG_LINE in log, "the nemodiff server did not run the Triton path"
        assert GRAPH_SAFE_LOG_LINE in log, "the nemodiff server did not run graph-safe passes"

        served = {name: _generate_all(server, prompts) for name, server in servers.items()}
        assert served["nemodiff"] == expected
        assert served["torch_native"] == expected
    finally:
        for server in servers.values():
            server.stop()


# ---- In-process: NemodiffAttnBackend.forward_extend vs TorchNativeAttnBackend on a paged pool.

class _Pool:
    """The slice of SGLang's token-to-KV pool the backends use."""

    def __init__(self, k_buffers, v_buffers):
        self.k_buffers, self.v_buffers = k_buffers, v_buffers

    def get_key_buffer(self, layer_id):
        return self.k_buffers[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v_buffers[layer_id]

    def set_kv_buffer(self, layer, loc, k, v):
        self.k_buffers[layer.layer_id][loc.loc] = k.view(-1, *self.k_buffers[0].shape[1:])
        self.v_buffers[layer.layer_id][loc.loc] = v.view(-1, *self.v_buffers[0].shape[1:])


def _paged_batch(seed=0, hq=4, hkv=2, d=16, layers=2, prefix_lens=(40, 7, 0),
                 extend_lens=(32, 5, 9), mode="DLLM_EXTEND"):
    """Requests with cached prefixes at scattered pool slots, plus their new tokens."""
    from types import SimpleNamespace

    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    gen = torch.Generator().manual_seed(seed)
    slots = 512
    perm = torch.randperm(slots, generator=gen).to(torch.int32)
    req_to_token = torch.zeros(8, 128, dtype=torch.int32)
    rows = [5, 2, 7]
    out_cache_loc, used = [], 0
    for row, p, e in zip(rows, prefix_lens, extend_lens):
        req_to_token[row, :p + e] = perm[used:used + p + e]
        out_cache_loc.append(perm[used + p:used + p + e])
        used += p + e
    pool = _Pool([torch.randn(slots, hkv, d, generator=gen) for _ in range(layers)],
                 [torch.randn(slots, hkv, d, generator=gen) for _ in range(layers)])
    total = sum(extend_lens)
    qkv = [torch.randn(total, h * d, generator=gen) for h in (hq, hkv, hkv)]
    ext = torch.tensor(extend_lens)
    pre = torch.tensor(prefix_lens)
    batch = SimpleNamespace(
        forward_mode=getattr(ForwardMode, mode), out_cache_loc=torch.cat(out_cache_loc).long(),
        req_pool_indices=torch.tensor(rows), seq_lens=pre + ext, extend_prefix_lens=pre,
        extend_seq_lens=ext, extend_start_loc=None, encoder_lens=None,
        extend_seq_lens_cpu=list(extend_lens), extend_prefix_lens_cpu=list(prefix_lens))
    runner = SimpleNamespace(device="cpu", token_to_kv_pool=pool,
                             req_to_token_pool=SimpleNamespace(req_to_token=req_to_token))
    return runner, batch, qkv


def _layer(attn_type, layer_id=1, hq=4, hkv=2, d=16):
    from types import SimpleNamespace

    return SimpleNamespace(layer_id=layer_id, attn_type=attn_type, tp_q_head_num=hq,
                           tp_k_head_num=hkv, tp_v_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                           scaling=d ** -0.5, is_cross_attention=False, sliding_window_size=None)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["EXTEND", "DLLM_EXTEND"])
def test_forward_extend_matches_torch_native(path, mode):
    import copy

    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType

    from sglang_nemodiff.attention_backend import NemodiffAttnBackend, triton_interpreting
    from sglang_nemodiff.kernels.structured_attention import (
        structured_attention,
        structured_attention_reference,
    )

    if path == "triton" and not triton_interpreting():
        pytest.skip("the Triton kernel runs on the CPU only with TRITON_INTERPRET=1 set at start")
    for attn_type in (AttentionType.DECODER, AttentionType.ENCODER_ONLY):
        runner, batch, (q, k, v) = _paged_batch(mode=mode)
        runner_ref = copy.deepcopy(runner)
        ours = NemodiffAttnBackend(runner)
        ours.attention = (structured_attention if path == "triton"
                          else structured_attention_reference)
        ours.init_forward_metadata(batch)
        expected_backend = TorchNativeAttnBackend(runner_ref)
        expected_backend.init_forward_metadata(batch)
        layer = _layer(attn_type)
        out = ours.forward_extend(q, k, v, layer, batch)
        expected = expected_backend.forward_extend(q, k, v, layer, batch)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        # The new K/V written to the same slots.
        pool, pool_ref = runner.token_to_kv_pool, runner_ref.token_to_kv_pool
        for a, b in zip(pool.k_buffers + pool.v_buffers, pool_ref.k_buffers + pool_ref.v_buffers):
            assert torch.equal(a, b)


def test_mask_kinds():
    from types import SimpleNamespace

    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_nemodiff.attention_backend import NemodiffAttnBackend
    from sglang_nemodiff.kernels.structured_attention import BLOCK_BIDIRECTIONAL, CAUSAL

    def kind(attn_type, mode):
        return NemodiffAttnBackend.mask_kind(_layer(attn_type),
                                             SimpleNamespace(forward_mode=mode))

    assert kind(AttentionType.DECODER, ForwardMode.DLLM_EXTEND) == CAUSAL
    assert kind(AttentionType.DECODER, ForwardMode.EXTEND) == CAUSAL
    assert kind(AttentionType.ENCODER_ONLY, ForwardMode.DLLM_EXTEND) == BLOCK_BIDIRECTIONAL
    assert kind(AttentionType.ENCODER_ONLY, ForwardMode.EXTEND) == BLOCK_BIDIRECTIONAL
    from sglang_nemodiff.kernels.structured_attention import SEED_CAUSAL

    from sglang_nemodiff.pass_kind import PassKind

    # an eager forward's pass kind (model.py puts it on the batch) wins over the layer's type
    seeded = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, nemodiff_kind=PassKind(SEED_CAUSAL))
    assert NemodiffAttnBackend.mask_kind(_layer(AttentionType.ENCODER_ONLY), seeded) == SEED_CAUSAL


def test_cli_and_server_args_keep_nemodiff(tmp_path):
    """Accepted by the stock CLI; in dLLM mode on CPU SGLang keeps it, with CUDA graphs off."""
    import argparse

    import sglang_nemodiff
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import ServerArgs

    from sglang_nemodiff.checkpoint import write_random_checkpoint
    from sglang_nemodiff.server_args import map_nemodiff_options

    sglang_nemodiff.register()
    HookRegistry.apply_hooks()  # as SGLang's load_plugins() does
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--attention-backend", "nemodiff",
                              "--prefill-attention-backend", "nemodiff"])
    assert args.attention_backend == args.prefill_attention_backend == "nemodiff"
    assert "nemodiff" in ATTENTION_BACKENDS

    ckpt = write_random_checkpoint(str(tmp_path / "tiny"))
    kwargs = dict(model_path=ckpt, device="cpu", attention_backend="nemodiff",
                  max_total_tokens=2048)
    server_args = ServerArgs(**kwargs, **map_nemodiff_options({"algorithm": "linearspec"}, kwargs))
    server_args.resolve_once()
    view = resolved_view(server_args)
    assert view.dllm_algorithm is not None
    assert view.attention_backend == "nemodiff"
    assert view.cuda_graph_config.decode.backend == "disabled"
    assert view.cuda_graph_config.prefill.backend == "disabled"

    # Outside dLLM mode too: CUDA graphs off, as for torch_native (not done for e.g. triton).
    plain = ServerArgs(**kwargs)
    plain.resolve_once()
    assert resolved_view(plain).cuda_graph_config.decode.backend == "disabled"
