"""Graph-safe passes: the pass kind is data the forward reads, so one captured graph serves
every pass kind of a round. Proven on the reference model's `forward_structured` (the attention
pattern a [T, T] tensor, the draft adapter a per-row 0/1 tensor): TorchDynamo captures the whole
forward as ONE graph (`fullgraph=True`) and never recompiles (`error_on_recompile`) while it
runs the draft, verify, denoise, refresh and AR passes of a round; the captured graph, run op by
op (`aot_eager`), equals the eager forward bit for bit in fp32. Negative control: the
Python-flag design (`forward(causal=..., use_draft_lora=...)`, the served model's today) makes
Dynamo recompile at the second pass kind, the guard a CUDA graph would not have.

On an H100 the same design ran under real CUDA graphs, one per query-token count, with every
replay equal to the eager forward of its kind (launch/gpu_forward_bench.py, docs/perf.md)."""

import pytest
import torch

from sglang_nemodiff.checkpoint import write_random_checkpoint
from sglang_nemodiff.reference import KVCache, NLDReference

B = 8  # block size: every pass of one round has B query tokens after the same cached prefix


def pass_kinds(T: int) -> dict:
    """name -> (allowed [T, T], adapter rows [T]) of each pass kind a round runs (causal_seed
    checkpoint: the draft pass keeps the seed row causal on the base weights)."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bidir = torch.ones(T, T, dtype=torch.bool)
    seed_causal = bidir.clone()
    seed_causal[0, 1:] = False
    none = torch.zeros(T, dtype=torch.bool)
    draft_rows = torch.ones(T, dtype=torch.bool)
    draft_rows[0] = False
    return {
        "draft": (seed_causal, draft_rows),       # LinearSpec: bidirectional with the adapter
        "verify": (causal, none),                 # LinearSpec: causal, base weights
        "denoise": (bidir, none),                 # FastDiffuser: bidirectional, base weights
        "denoise_lora": (bidir, draft_rows),      # FastDiffuser with denoise_lora
        "refresh": (causal.clone(), none.clone()),  # FastDiffuser: causal KV of the whole block
        "ar": (causal.clone(), none.clone()),     # ar_mode: causal
    }


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory):
    path = write_random_checkpoint(str(tmp_path_factory.mktemp("graphsafe") / "tiny"), seed=3,
                                   lora_rank=8, causal_seed=True)
    model = NLDReference.from_pretrained(path, dtype=torch.float32)
    assert model.draft_lora is not None
    cache = KVCache()
    prefix = torch.arange(5, 17)
    with torch.no_grad():
        cache.append(model.forward(prefix)[1])
    return model, cache


def test_one_graph_serves_every_pass_kind_bit_for_bit(model_and_cache):
    model, cache = model_and_cache
    torch._dynamo.reset()
    past = len(cache)
    ids = torch.tensor([42, *([model.config.mask_token_id] * (B - 1))])
    positions = torch.arange(past, past + B)

    def forward(ids, positions, allowed, rows):
        return model.forward_structured(ids, cache, positions, allowed, rows)[0]

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend="aot_eager")
    outputs = {}
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for name, (allowed, rows) in pass_kinds(B).items():
            got = compiled(ids, positions, allowed, rows)
            want = forward(ids, positions, allowed, rows)
            assert torch.equal(got, want), name
            outputs[name] = want
    # The kinds really differ (else one graph serving them all would prove nothing).
    assert not torch.equal(outputs["draft"], outputs["denoise"])
    assert not torch.equal(outputs["denoise"], outputs["verify"])
    assert not torch.equal(outputs["denoise_lora"], outputs["denoise"])
    # And the structured forward is the model: the flag forward gives the same logits.
    with torch.no_grad():
        verify, _ = model.forward(ids, cache, causal=True)
    assert torch.equal(verify, outputs["verify"])


def test_python_flag_design_recompiles_per_pass_kind(model_and_cache):
    """Negative control: the pass kind as Python flags (what a CUDA graph freezes at capture)."""
    model, cache = model_and_cache
    torch._dynamo.reset()
    ids = torch.tensor([42, *([model.config.mask_token_id] * (B - 1))])

    def forward(ids, causal: bool, draft: bool):
        return model.forward(ids, cache, causal=causal, use_draft_lora=draft)[0]

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        compiled(ids, False, True)  # draft
        with pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(ids, True, False)  # verify: another graph
