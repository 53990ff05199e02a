"""The served model's passes are graph-safe (model.py, pass_kind.py): with `cuda_graphs: true` the
pass kind is data the forward reads, so ONE captured graph serves every pass kind of a round.

Proof on this CPU: SGLang's own layers and the `nemodiff` attention backend over real SGLang KV
pools, built in this process (no server: the compiler needs the forward in hand). The model's
`forward` compiled by TorchDynamo as one graph (`fullgraph=True`, `aot_eager` runs the captured
graph op by op) under `error_on_recompile` runs the verify / refresh / AR-step kind (causal), the
draft (seed-causal with the adapter), the bidirectional denoise with and without the adapter and a
quadratic round, at one token count, and equals the eager forward bit for bit in fp32; and the
eager model (the Python-flag design every server runs unless `cuda_graphs` is set) gives the same
logits. Negative control: compiling the eager model's forward recompiles at the second kind
(a CUDA graph captured from it would replay the first kind for all; model.GraphPassGuard)."""

import os
import types

import pytest
import torch

from sglang_nemodiff.checkpoint import write_random_checkpoint
from sglang_nemodiff.kernels.structured_attention import (
    BLOCK_BIDIRECTIONAL,
    CAUSAL,
    QUADRATIC,
    SEED_CAUSAL,
)
from sglang_nemodiff.pass_kind import PassKind
from sglang_nemodiff.quadratic_layout import QuadraticLayout
from sglang_nemodiff.settings import AlgorithmSettings

LAYOUT = QuadraticLayout.for_checkpoint(3, shift_logits=True)  # 3 + 3 x 2 = 9 query tokens
T = LAYOUT.tokens
PREFIXES = (5, 11)  # two requests with different cached prefixes
KINDS = {
    "causal (verify, refresh, AR step)": PassKind(CAUSAL),
    "draft (seed-causal + adapter)": PassKind(SEED_CAUSAL, adapter=True),
    "denoise (seed-causal)": PassKind(SEED_CAUSAL),
    "denoise, block-bidirectional": PassKind(BLOCK_BIDIRECTIONAL),
    "denoise with the adapter": PassKind(BLOCK_BIDIRECTIONAL, adapter=True),
    "quadratic round": PassKind(QUADRATIC, adapter=True, layout=LAYOUT),
}


class Served:
    """One model, its KV pools and attention backend, in this process."""

    def __init__(self, path, graph_safe: bool, monkeypatch):
        from safetensors.torch import load_file
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from transformers import AutoConfig

        import sglang_nemodiff.settings
        from sglang_nemodiff.attention_backend import NemodiffAttnBackend
        from sglang_nemodiff.model import NemotronLabsDiffusionModel

        monkeypatch.setattr(sglang_nemodiff.settings, "current_settings",
                            lambda: AlgorithmSettings(cuda_graphs=graph_safe))
        self.config = config = AutoConfig.from_pretrained(path)
        self.model = NemotronLabsDiffusionModel(config)
        self.model.load_weights(load_file(os.path.join(path, "model.safetensors")).items())
        assert self.model.pass_options.graph_safe == graph_safe
        self.r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
        kv = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32,
                              head_num=config.num_key_value_heads, head_dim=config.head_dim,
                              layer_num=config.num_hidden_layers, device="cpu",
                              enable_memory_saver=False)
        self.backend = NemodiffAttnBackend(types.SimpleNamespace(
            device="cpu", req_to_token_pool=self.r2t, token_to_kv_pool=kv))
        for b, prefix in enumerate(PREFIXES):
            self.r2t.req_to_token[b + 1, :prefix + T] = torch.arange(1 + 100 * b, 1 + 100 * b + prefix + T)
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, config.mask_token_id, (sum(PREFIXES),), generator=gen)
        self.forward(prompt, [0, 0], list(PREFIXES), None)  # the prefixes' KV (eager, causal)

    def batch(self, ids, prefixes, lengths):
        from sglang.srt.model_executor.forward_batch_info import (
            CaptureHiddenMode,
            ForwardBatch,
            ForwardMode,
        )

        dllm = prefixes[0] > 0
        seq = [p + n for p, n in zip(prefixes, lengths)]
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        return ForwardBatch(
            forward_mode=ForwardMode.DLLM_EXTEND if dllm else ForwardMode.EXTEND,
            batch_size=len(prefixes), input_ids=ids, req_pool_indices=torch.arange(1, len(prefixes) + 1),
            seq_lens=torch.tensor(seq), seq_lens_sum=sum(seq), seq_lens_cpu=torch.tensor(seq),
            out_cache_loc=torch.cat([self.r2t.req_to_token[b + 1, p:p + n].long()
                                     for b, (p, n) in enumerate(zip(prefixes, lengths))]),
            positions=torch.cat([torch.arange(p, p + n) for p, n in zip(prefixes, lengths)]),
            extend_seq_lens=torch.tensor(lengths), extend_prefix_lens=torch.tensor(prefixes),
            extend_start_loc=starts, extend_seq_lens_cpu=list(lengths),
            extend_prefix_lens_cpu=list(prefixes), capture_hidden_mode=CaptureHiddenMode.NULL)

    def forward(self, ids, prefixes, lengths, kind, forward=None):
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        batch = self.batch(ids, prefixes, lengths)
        self.backend.init_forward_metadata(batch)
        options = self.model.pass_options
        if kind is not None:
            options.set_kind(kind)
        try:
            with forward_context(ForwardContext(attn_backend=self.backend), forward_batch=batch):
                out = (forward or self.model.forward)(batch.input_ids, batch.positions, batch)
        finally:
            options.clear()
        return out.full_logits if out.full_logits is not None else out.next_token_logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sglang.test.layer_ut_utils import init_single_process_dist

    import sglang_nemodiff

    init_single_process_dist(29000 + os.getpid() % 1000)
    sglang_nemodiff.register()
    # A converted-AR convention (shifted drafts, causal seed) with an unmerged adapter: every
    # data-driven piece of the forward (seed rows, quadratic rows, the logits shift) is used.
    return write_random_checkpoint(str(tmp_path_factory.mktemp("graphsafe") / "ckpt"), seed=4,
                                   lora_rank=4, shift_logits=True, causal_seed=True)


def round_ids(config):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.mask_token_id, (len(PREFIXES), T), generator=gen)
    ids[:, LAYOUT.block_len:] = config.mask_token_id
    return ids.reshape(-1)


def test_one_graph_serves_every_pass_kind(checkpoint, monkeypatch):
    served = Served(checkpoint, graph_safe=True, monkeypatch=monkeypatch)
    eager_model = Served(checkpoint, graph_safe=False, monkeypatch=monkeypatch)
    ids = round_ids(served.config)
    torch._dynamo.reset()
    compiled = torch.compile(served.model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
    outputs = {}
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for name, kind in KINDS.items():
            got = served.forward(ids, list(PREFIXES), [T, T], kind, compiled)
            want = served.forward(ids, list(PREFIXES), [T, T], kind)
            assert torch.equal(got, want), name
            # the Python-flag forward of every eager server computes the same pass
            assert torch.equal(eager_model.forward(ids, list(PREFIXES), [T, T], kind), want), name
            outputs[name] = want
    # The kinds really differ (else one graph serving them all would prove nothing).
    values = list(outputs.values())
    for i in range(len(values)):
        for j in range(i):
            assert not torch.equal(values[i], values[j]), (list(outputs)[i], list(outputs)[j])


def test_eager_model_recompiles_per_pass_kind(checkpoint, monkeypatch):
    """Negative control: the kind chosen in Python is a guard of the compiled graph."""
    served = Served(checkpoint, graph_safe=False, monkeypatch=monkeypatch)
    ids = round_ids(served.config)
    torch._dynamo.reset()
    compiled = torch.compile(served.model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        served.forward(ids, list(PREFIXES), [T, T], KINDS["draft (seed-causal + adapter)"], compiled)
        with pytest.raises(torch._dynamo.exc.RecompileError):
            served.forward(ids, list(PREFIXES), [T, T], KINDS["causal (verify, refresh, AR step)"],
                           compiled)


def test_backend_graph_hooks_capture_once_and_replay(checkpoint, monkeypatch):
    """The nemodiff backend's CUDA-graph hooks, driven as SGLang's dLLM graph runner drives them,
    with torch.compile standing in for the capture: static batch buffers without the extend
    fields (the runner's), `init_forward_metadata_out_graph` on the host, then the recorded part
    (`init_forward_metadata_in_graph` + the forward) compiled once; replays rewrite the buffers
    in place (other prefixes, other tokens, another pass kind) and equal eager forwards of real
    batches. Nothing recompiles."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    served = Served(checkpoint, graph_safe=True, monkeypatch=monkeypatch)
    backend, model, bs = served.backend, served.model, len(PREFIXES)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4 * T)
    static = ForwardBatch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=bs,
                          input_ids=torch.zeros(bs * T, dtype=torch.long),
                          req_pool_indices=torch.arange(1, bs + 1), seq_lens=torch.zeros(bs, dtype=torch.long),
                          out_cache_loc=torch.zeros(bs * T, dtype=torch.long), seq_lens_sum=0,
                          positions=torch.zeros(bs * T, dtype=torch.long))
    static.capture_hidden_mode = served.batch(round_ids(served.config), list(PREFIXES), [T, T]).capture_hidden_mode

    def recorded():
        backend.init_forward_metadata_in_graph(static)
        return model.forward(static.input_ids, static.positions, static).full_logits

    torch._dynamo.reset()
    compiled = torch.compile(recorded, fullgraph=True, dynamic=False, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    cases = [((5, 11), KINDS["draft (seed-causal + adapter)"]), ((9, 4), KINDS["quadratic round"]),
             ((11, 7), KINDS["causal (verify, refresh, AR step)"])]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for prefixes, kind in cases:
            ids = round_ids(served.config)
            ids[ids != served.config.mask_token_id] = torch.randint(
                0, served.config.mask_token_id, (int((ids != served.config.mask_token_id).sum()),),
                generator=gen)
            real = served.batch(ids, list(prefixes), [T, T])
            want = served.forward(ids, list(prefixes), [T, T], kind)
            # the runner's replay: fill the static buffers, host-side metadata, replay
            static.input_ids.copy_(real.input_ids)
            static.positions.copy_(real.positions)
            static.seq_lens.copy_(real.seq_lens)
            static.out_cache_loc.copy_(real.out_cache_loc)
            backend.init_forward_metadata_out_graph(static)
            model.pass_options.set_kind(kind)
            try:
                with forward_context(ForwardContext(attn_backend=backend), forward_batch=static):
                    got = compiled()
            finally:
                model.pass_options.clear()
            assert torch.equal(got, want), (prefixes, kind)


def test_a_quadratic_server_drafts_each_round_kind_with_its_adapter(checkpoint, tmp_path, monkeypatch):
    """A quadratic server holds two adapters (model.load_draft_lora): the checkpoint's
    quadratic_lora/ for quadratic rounds, linear_spec_lora/ for every other adapter pass (its
    LinearSpec rounds under `block_size: auto`). Eager (merged or not) and graph-safe (both
    deltas computed, each scaled by the pass data) agree, and the graph-safe forward still
    compiles to one graph across the kinds. Negative control: each kind's output differs from
    the one with the other adapter."""
    import shutil

    from safetensors.torch import load_file, save_file

    quadratic_dir = tmp_path / "quadratic_lora"
    shutil.copytree(os.path.join(checkpoint, "linear_spec_lora"), quadratic_dir)
    tensors = load_file(str(quadratic_dir / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(9)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in tensors.items()},
              str(quadratic_dir / "adapter_model.safetensors"))
    draft_kind, quad_kind = KINDS["draft (seed-causal + adapter)"], KINDS["quadratic round"]
    ids = round_ids(Served(checkpoint, graph_safe=False, monkeypatch=monkeypatch).config)

    def run(served, kind, forward=None):
        return served.forward(ids, list(PREFIXES), [T, T], kind, forward)

    one = Served(checkpoint, graph_safe=False, monkeypatch=monkeypatch)  # the draft adapter only
    both = {}
    for graph_safe in (False, True):
        served = Served(checkpoint, graph_safe=graph_safe, monkeypatch=monkeypatch)
        served.model._load_adapter("quadratic", str(quadratic_dir))
        both[graph_safe] = served
    with torch.no_grad():
        for served in both.values():
            assert torch.equal(run(served, draft_kind), run(one, draft_kind))  # LinearSpec's adapter
            assert not torch.equal(run(served, quad_kind), run(one, quad_kind))  # the quadratic one
        assert torch.allclose(run(both[True], quad_kind), run(both[False], quad_kind), atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(both[True].model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for kind in (draft_kind, quad_kind, KINDS["causal (verify, refresh, AR step)"]):
            assert torch.equal(run(both[True], kind, compiled), run(both[True], kind))
