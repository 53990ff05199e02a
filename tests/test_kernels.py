"""Kernel tests: Triton kernels vs their PyTorch references.

Runs natively on a CUDA GPU. Without one the Triton kernels run under the Triton interpreter, which
is only on in a process that had TRITON_INTERPRET=1 set before it first imported triton (triton
decides at import and at `@triton.jit` decoration). So on a CPU machine the tests that launch a
kernel run their bodies in one worker process started with the variable set: this process's
environment and its triton stay as they were, whatever ran before or runs after this file. Shapes
are tiny so the whole file stays fast under the interpreter.
"""

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from sglang_nemodiff.kernels import (
    BLOCK_BIDIRECTIONAL,
    CAUSAL,
    QUADRATIC,
    SEED_CAUSAL,
    build_mask,
    confidence_argmax,
    confidence_argmax_reference,
    fastdiffuser_commit,
    fastdiffuser_commit_reference,
    linearspec_accept,
    linearspec_accept_reference,
    structured_attention,
    structured_attention_reference,
    triton_interpreting,
)

_HAS_CUDA = torch.cuda.is_available()
# Kernels run in this process on CUDA, or when the session itself started under the interpreter
# (as the worker below does); otherwise in the worker.
_RUN_HERE = _HAS_CUDA or triton_interpreting()
_WORKER = None


@pytest.fixture(scope="module", autouse=True)
def _interpreter_worker():
    """On a CPU machine: one spawned worker process with TRITON_INTERPRET=1 for this module's
    kernel launches. The variable is set here only while the worker starts, then restored."""
    global _WORKER
    if _RUN_HERE:
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _WORKER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        _WORKER.submit(os.getpid).result()  # the worker starts (and copies the environment) now
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    try:
        yield
    finally:
        _WORKER.shutdown()
        _WORKER = None


def _call_here(name, args, kwargs):
    return globals()[name](*args, **kwargs)


def launches_kernels(test):
    """Run the test body here if Triton can run here, else in the interpreter worker."""
    if _RUN_HERE:
        return test

    @functools.wraps(test)
    def in_worker(*args, **kwargs):
        return _WORKER.submit(_call_here, test.__name__, args, kwargs).result()

    return in_worker


DEV = "cuda" if _HAS_CUDA else "cpu"
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------------------------
# structured attention
# --------------------------------------------------------------------------------------------


def _make_batch(seed, Hq, Hkv, D, dtype, prefix_lens, ext_lens, max_ctx=64, extra_slots=37,
                idx_dtype=torch.int32):
    """Ragged extend batch over a shuffled (non-contiguous) token pool."""
    g = torch.Generator().manual_seed(seed)
    B = len(prefix_lens)
    T = sum(ext_lens)
    n_rows = B + 2
    num_slots = n_rows * max_ctx + extra_slots
    q = torch.randn(T, Hq, D, generator=g)
    k_new = torch.randn(T, Hkv, D, generator=g)
    v_new = torch.randn(T, Hkv, D, generator=g)
    k_cache = torch.randn(num_slots, Hkv, D, generator=g)
    v_cache = torch.randn(num_slots, Hkv, D, generator=g)
    # every request row gets a random, scattered set of slots
    perm = torch.randperm(num_slots, generator=g)
    req_to_token = perm[: n_rows * max_ctx].reshape(n_rows, max_ctx)
    req_pool_indices = torch.randperm(n_rows, generator=g)[:B]
    starts = [0]
    for e in ext_lens[:-1]:
        starts.append(starts[-1] + e)

    def it(x):
        return torch.tensor(x, dtype=idx_dtype, device=DEV)

    cast = lambda x: x.to(device=DEV, dtype=dtype)  # noqa: E731
    return dict(
        q=cast(q), k_new=cast(k_new), v_new=cast(v_new), k_cache=cast(k_cache),
        v_cache=cast(v_cache), req_to_token=req_to_token.to(device=DEV, dtype=idx_dtype),
        req_pool_indices=req_pool_indices.to(device=DEV, dtype=torch.int64),
        prefix_lens=it(prefix_lens), extend_start_loc=it(starts), extend_lens=it(ext_lens),
    )


def _run_and_check(batch, mask_kind, dtype, num_splits=None, sm_scale=None):
    D = batch["q"].shape[-1]
    sm_scale = sm_scale if sm_scale is not None else D ** -0.5
    out = torch.full_like(batch["q"], float("nan"))  # every element must be written
    res = structured_attention(**batch, mask_kind=mask_kind, sm_scale=sm_scale, out=out,
                               num_splits=num_splits)
    assert res is out
    ref = structured_attention_reference(**batch, mask_kind=mask_kind, sm_scale=sm_scale)
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    assert out.dtype == batch["q"].dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs err {err}"
    return out


CASES = {
    # name: (mask kinds per request, prefix lens, extend lens)
    "causal": ([CAUSAL] * 3, [0, 9, 37], [5, 19, 12]),
    "bidir": ([BLOCK_BIDIRECTIONAL] * 3, [13, 0, 33], [7, 16, 3]),
    "mixed": ([BLOCK_BIDIRECTIONAL, CAUSAL, BLOCK_BIDIRECTIONAL], [21, 6, 0], [20, 9, 17]),
    "seed_causal": ([SEED_CAUSAL, SEED_CAUSAL, CAUSAL], [11, 0, 25], [16, 9, 8]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("case", list(CASES))
@launches_kernels
def test_structured_attention(case, heads, dtype):
    kinds, pls, els = CASES[case]
    Hq, Hkv = heads
    seed = 10 * list(CASES).index(case) + Hq  # fixed seed per case
    batch = _make_batch(seed, Hq, Hkv, 16, dtype, pls, els)
    kind = kinds[0] if len(set(kinds)) == 1 else torch.tensor(kinds, dtype=torch.int32,
                                                                   device=DEV)
    _run_and_check(batch, kind, dtype)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@launches_kernels
def test_structured_attention_split_kv(num_splits, dtype):
    # split-KV over the prefix + merge kernel; includes a zero-prefix request and more splits
    # than a short prefix has tiles (empty splits).
    kinds = torch.tensor([CAUSAL, CAUSAL, BLOCK_BIDIRECTIONAL], dtype=torch.int32, device=DEV)
    batch = _make_batch(7, 4, 2, 16, dtype, [45, 0, 3], [6, 20, 11])
    _run_and_check(batch, kinds, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["gqa4", "mha"])
@launches_kernels
def test_structured_attention_quadratic(heads, dtype):
    """Quadratic rounds (L = 3, g = 3: 12 tokens; block 16 tiles split mid-group) beside a causal
    request, against the reference; negative control: the block-bidirectional pattern differs."""
    Hq, Hkv = heads
    kinds = torch.tensor([QUADRATIC, CAUSAL, QUADRATIC], dtype=torch.int32, device=DEV)
    batch = _make_batch(40 + Hq, Hq, Hkv, 16, dtype, [11, 25, 0], [12, 8, 12])
    D = batch["q"].shape[-1]
    out = torch.full_like(batch["q"], float("nan"))
    structured_attention(**batch, mask_kind=kinds, sm_scale=D ** -0.5, out=out, quadratic=(3, 3))
    ref = structured_attention_reference(**batch, mask_kind=kinds, sm_scale=D ** -0.5, quadratic=(3, 3))
    assert (out.float() - ref.float()).abs().max().item() <= ATOL[dtype]
    bidir = structured_attention_reference(**batch, mask_kind=BLOCK_BIDIRECTIONAL, sm_scale=D ** -0.5)
    assert (bidir[:12].float() - ref[:12].float()).abs().max().item() > 10 * ATOL[dtype]


@launches_kernels
def test_structured_attention_reads_the_pass_kind_from_data():
    """Graph-safe passes (pass_kind.py): the kind and a quadratic round's (L, g) are tensors the
    kernel reads, written in place between launches. On CUDA one launch is captured in a CUDA
    graph and replayed for every kind (a graph of the served forward does the same); on CPU the
    same buffers are rewritten between interpreted launches. Each equals the reference of its
    kind, and the kinds differ."""
    batch = _make_batch(51, 4, 2, 16, torch.float32, [7, 20], [9, 9])
    D = batch["q"].shape[-1]
    kinds = torch.zeros(2, dtype=torch.int32, device=DEV)
    quad = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    out = torch.zeros_like(batch["q"])

    def launch():
        structured_attention(**batch, mask_kind=kinds, sm_scale=D ** -0.5, out=out, quadratic=quad,
                             max_extend_len=9, max_prefix_len=20)

    graph = None
    if _HAS_CUDA:
        launch()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
    results = []
    for kind, shape in ((CAUSAL, (0, 1)), (BLOCK_BIDIRECTIONAL, (0, 1)), (SEED_CAUSAL, (0, 1)),
                        (QUADRATIC, (3, 2))):
        kinds.fill_(kind)
        quad.copy_(torch.tensor(shape, dtype=torch.int32))
        out.zero_()
        graph.replay() if graph is not None else launch()
        ref = structured_attention_reference(**batch, mask_kind=kind, sm_scale=D ** -0.5,
                                             quadratic=shape if kind == QUADRATIC else None)
        assert (out - ref).abs().max().item() <= ATOL[torch.float32], kind
        results.append(out.clone())
    for i in range(len(results)):
        for j in range(i):
            assert not torch.equal(results[i], results[j])


@launches_kernels
def test_structured_attention_all_zero_prefix_and_odd_shapes():
    # no prefix at all, head_dim not a power of two, G = 3 (padded to 4), int64 indices
    batch = _make_batch(3, 6, 2, 24, torch.float32, [0, 0], [1, 23], idx_dtype=torch.int64)
    _run_and_check(batch, CAUSAL, torch.float32)
    _run_and_check(batch, BLOCK_BIDIRECTIONAL, torch.float32)


@launches_kernels
def test_structured_attention_strided_q():
    # q a strided view (not contiguous)
    batch = _make_batch(11, 4, 2, 16, torch.float32, [5, 17], [12, 12])
    wide = torch.randn(batch["q"].shape[0], 4, 32, device=DEV)
    wide[..., :16] = batch["q"]
    batch["q"] = wide[..., :16]
    assert not batch["q"].is_contiguous()
    _run_and_check(batch, CAUSAL, torch.float32)
    _run_and_check(batch, BLOCK_BIDIRECTIONAL, torch.float32)


@launches_kernels
def test_structured_attention_default_out_and_hints():
    # includes a request with no new tokens (extend_len 0)
    batch = _make_batch(5, 2, 1, 16, torch.float16, [4, 30, 9], [8, 3, 0])
    ref = structured_attention_reference(**batch, mask_kind=CAUSAL, sm_scale=0.3)
    out = structured_attention(**batch, mask_kind=CAUSAL, sm_scale=0.3, max_extend_len=8,
                               max_prefix_len=30)
    assert (out.float() - ref.float()).abs().max().item() <= ATOL[torch.float16]


def test_build_mask_semantics():
    assert build_mask(CAUSAL, 1, 3).tolist() == [[True, True, False, False],
                                                 [True, True, True, False],
                                                 [True, True, True, True]]
    assert build_mask(BLOCK_BIDIRECTIONAL, 2, 3).all()
    # the seed (row 0) sees the prefix and itself; the other rows see everything
    assert build_mask(SEED_CAUSAL, 1, 3).tolist() == [[True, True, False, False],
                                                      [True, True, True, True],
                                                      [True, True, True, True]]
    with pytest.raises(ValueError):
        build_mask(4, 1, 3)
    # QUADRATIC: the round layout's pattern (quadratic_layout.py) after an all-visible prefix
    quad = build_mask(QUADRATIC, 2, 6, quadratic=(2, 2))
    assert quad[:, :2].all() and quad[:, 2:].tolist() == [
        [True, False, False, False, False, False],  # d_0
        [True, True, False, False, False, False],  # d_1
        [True, False, True, True, False, False],  # group 0 (after d_0)
        [True, False, True, True, False, False],
        [True, True, False, False, True, True],  # group 1 (after d_1)
        [True, True, False, False, True, True]]


@pytest.mark.parametrize("kind", [CAUSAL, BLOCK_BIDIRECTIONAL], ids=["causal", "bidir"])
def test_reference_matches_sdpa(kind):
    # the reference itself against torch SDPA with the dense mask (one request)
    batch = _make_batch(1, 4, 2, 16, torch.float32, [7], [20])
    ref = structured_attention_reference(**batch, mask_kind=kind, sm_scale=0.25)
    slots = batch["req_to_token"][batch["req_pool_indices"][0], :7].long()
    k = torch.cat([batch["k_cache"][slots], batch["k_new"]]).repeat_interleave(2, 1)
    v = torch.cat([batch["v_cache"][slots], batch["v_new"]]).repeat_interleave(2, 1)
    mask = build_mask(kind, 7, 20, device=DEV)
    sd = F.scaled_dot_product_attention(batch["q"].transpose(0, 1), k.transpose(0, 1),
                                        v.transpose(0, 1), attn_mask=mask, scale=0.25)
    assert torch.allclose(sd.transpose(0, 1), ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# confidence / argmax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("V,block_v,num_splits", [(1000, 256, 1), (4999, 512, None),
                                                  (4999, 512, 3)])
@launches_kernels
def test_confidence_argmax(V, block_v, num_splits, dtype):
    g = torch.Generator().manual_seed(V + (num_splits or 0))
    N, mask_id = 9, 100
    x = torch.randn(N, V, generator=g) * 3
    x[0, mask_id] = 40.0  # mask id is the true max: excluded from argmax, kept in softmax
    x[1, mask_id] = 40.0
    x[1, V - 1] = 39.0  # best candidate in the last (partial) tile
    x[2, 7] = x[2, V - 3] = 30.0  # tie across tiles/splits: lowest index wins
    x[3, 600] = x[3, 601] = 30.0  # tie inside a tile
    x[4, :] = 0.0  # all equal: index 0
    x[5, 0] = 25.0  # best at index 0
    x[6, :mask_id] = -1e4  # best right after the mask id
    x[6, mask_id + 1] = 5.0
    x = x.to(device=DEV, dtype=dtype)
    tok, prob = confidence_argmax(x, mask_id, num_splits=num_splits, block_v=block_v)
    rtok, rprob = confidence_argmax_reference(x, mask_id)
    assert tok.dtype == torch.int64 and prob.dtype == torch.float32
    assert tok.tolist() == rtok.tolist()
    assert (tok != mask_id).all()
    torch.testing.assert_close(prob, rprob, atol=1e-6, rtol=1e-5)
    assert tok[2].item() == 7 and tok[3].item() == 600 and tok[4].item() == 0


# --------------------------------------------------------------------------------------------
# decision functions
# --------------------------------------------------------------------------------------------


def test_fastdiffuser_commit():
    g = torch.Generator().manual_seed(0)
    R, B = 12, 8
    prob = torch.rand(R, B, generator=g)
    is_masked = torch.rand(R, B, generator=g) < 0.6
    is_masked[0] = False  # no masks: nothing committed
    is_masked[1] = True
    prob[1] = 0.95  # all above threshold, all tied
    prob[2] = 0.5
    is_masked[2] = True  # all tied below threshold: only index 0
    prob[3, 5] = 0.99
    is_masked[3, 5] = False  # best unmasked prob must not count
    for th in (0.9, 0.0, 1.01, torch.linspace(0.2, 1.0, R)):
        args = [t.to(DEV) for t in (prob, is_masked)]
        th_d = th.to(DEV) if isinstance(th, torch.Tensor) else th
        got = fastdiffuser_commit(*args, th_d).cpu()
        ref = fastdiffuser_commit_reference(prob, is_masked, th)
        assert torch.equal(got, ref)
        assert not got[0].any()
        assert not (got & ~is_masked).any()
        assert (got.sum(1)[is_masked.any(1)] >= 1).all()
    assert fastdiffuser_commit(prob, is_masked, 1.01)[2].nonzero().flatten().tolist() == [0]


def test_linearspec_accept():
    g = torch.Generator().manual_seed(1)
    R, B = 10, 6
    ver = torch.randint(0, 5, (R, B), generator=g)
    block = torch.randint(0, 5, (R, B), generator=g)
    block[0, 1:] = ver[0, :-1]  # all accepted -> c = B-1, bonus = ver[B-1]
    block[1, 1] = ver[1, 0] + 1  # none accepted
    block[2, 1:4] = ver[2, 0:3]
    block[2, 4] = ver[2, 3] + 1  # exactly 3
    block[2, 5] = ver[2, 4]  # a later match after a mismatch does not count
    c, bonus = linearspec_accept(block.to(DEV), ver.to(DEV))
    rc, rbonus = linearspec_accept_reference(block, ver)
    assert c.cpu().tolist() == rc.tolist() and bonus.cpu().tolist() == rbonus.tolist()
    assert c[0].item() == B - 1 and bonus[0].item() == ver[0, B - 1].item()
    assert c[1].item() == 0 and bonus[1].item() == ver[1, 0].item()
    assert c[2].item() == 3


def test_jit_kernels_read_only_constexpr_globals(tmp_path):
    """A compiled Triton kernel may read a module global only if it is a `tl.constexpr` (or a
    module, function, kernel); the interpreter these tests use on CPU accepts plain numbers, the
    compiler refuses them (found on the first H100 run). Checked statically, so CPU CI catches it.
    Negative control: a kernel reading a plain int is reported."""
    import types

    import triton
    import triton.language as tl

    from sglang_nemodiff.kernels import confidence, speculative, structured_attention

    def offenders(fn):
        code = fn.fn.__code__
        names = set(code.co_names)
        for const in code.co_consts:  # nested code objects (none today, but cheap to cover)
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        bad = []
        for name in sorted(names):
            if name not in fn.fn.__globals__:
                continue
            value = fn.fn.__globals__[name]
            if isinstance(value, (bool, int, float, str)) and not isinstance(value, tl.constexpr):
                bad.append(name)
        return bad

    kernels = [obj for mod in (confidence, speculative, structured_attention)
               for obj in vars(mod).values() if isinstance(obj, triton.runtime.JITFunction)]
    assert kernels
    found = {k.fn.__name__: offenders(k) for k in kernels}
    assert not any(found.values()), found

    import importlib.util

    source = tmp_path / "bad_kernel_module.py"
    source.write_text("import triton\nimport triton.language as tl\n\nPLAIN = 7\nOK = tl.constexpr(7)\n\n\n"
                      "@triton.jit\ndef bad_kernel(X):\n    tl.store(X, PLAIN + OK)\n")
    spec = importlib.util.spec_from_file_location("bad_kernel_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert offenders(module.bad_kernel) == ["PLAIN"]
