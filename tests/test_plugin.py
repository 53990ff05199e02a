"""The plugin's own surface: registration, CLI options, settings, start-up target checks."""

import json
import subprocess
import sys

import pytest

from sglang_nemodiff.algorithms.server_defaults import DEFAULT_MAX_RUNNING_REQUESTS
from sglang_nemodiff.server_args import map_nemodiff_options
from sglang_nemodiff.settings import DEFAULT_CONFIG, AlgorithmSettings, load_settings


def test_cli_help_lists_algorithm_options():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                         capture_output=True, text=True, timeout=300).stdout
    assert "--algorithm {ar,fastdiffuser,linearspec,quadratic}" in out
    assert "--ar-mode" in out and "--algorithm-config" in out


def test_algorithm_maps_onto_sglang_fields():
    """`--algorithm` names SGLang fields only; the server defaults are the hook's (below)."""
    assert map_nemodiff_options({}, {}) == {}
    ar = map_nemodiff_options({"algorithm": "ar"}, {"json_model_override_args": '{"x": 1}'})
    assert json.loads(ar["json_model_override_args"]) == {"x": 1, "ar_mode": True}
    assert "dllm_algorithm" not in ar
    assert map_nemodiff_options({"algorithm": "linearspec"}, {}) == {"dllm_algorithm": "NemodiffLinearSpec"}
    fast = map_nemodiff_options({"algorithm": "fastdiffuser", "algorithm_config": DEFAULT_CONFIG}, {})
    assert fast == {"dllm_algorithm": "NemodiffFastDiffuser", "dllm_algorithm_config": DEFAULT_CONFIG}
    with pytest.raises(ValueError, match="--ar-mode contradicts"):
        map_nemodiff_options({"algorithm": "linearspec", "ar_mode": True}, {})
    with pytest.raises(ValueError, match="Unknown --algorithm"):
        map_nemodiff_options({"algorithm": "cubic"}, {})
    with pytest.raises(ValueError, match="contradicts --dllm-algorithm"):
        map_nemodiff_options({"algorithm": "linearspec"}, {"dllm_algorithm": "NemodiffFastDiffuser"})


def _resolved(tmp_path, device: str, plugin_options: dict, **kwargs):
    """The fully resolved ServerArgs view SGLang would start a server with (no server started)."""
    import sglang_nemodiff
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import ServerArgs

    from sglang_nemodiff.checkpoint import write_random_checkpoint

    sglang_nemodiff.register()
    HookRegistry.apply_hooks()  # as SGLang's load_plugins() does
    ckpt = str(tmp_path / "tiny")
    if not (tmp_path / "tiny").exists():
        write_random_checkpoint(ckpt)
    base = dict(model_path=ckpt, device=device, max_total_tokens=2048, **kwargs)
    server_args = ServerArgs(**base, **map_nemodiff_options(plugin_options, base))
    server_args.resolve_once()
    return resolved_view(server_args)


def _fields(view) -> dict:
    from sglang.srt.arg_groups.arg_utils import field_names
    from sglang.srt.server_args import ServerArgs

    names = field_names(ServerArgs)
    assert len(names) > 100  # the whole record, not an empty comparison
    return {name: getattr(view, name) for name in names}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("mode,class_name", [("linearspec", "NemodiffLinearSpec"),
                                             ("fastdiffuser", "NemodiffFastDiffuser"),
                                             ("quadratic", "NemodiffQuadratic")])
def test_both_algorithm_spellings_resolve_to_the_same_server(tmp_path, device, mode, class_name):
    """`--algorithm linearspec` and SGLang's `--dllm-algorithm NemodiffLinearSpec` resolve every
    ServerArgs field alike (the defaults live in the algorithms' configure_server_args hook):
    max running requests 16, CUDA graphs off in both phases (also for --device cuda), the
    checkpoint's ar_mode off, the packaged algorithm YAML, SGLang's overlap-schedule rule."""
    ours = _fields(_resolved(tmp_path, device, {"algorithm": mode}, random_seed=1))
    sglangs = _fields(_resolved(tmp_path, device, {}, dllm_algorithm=class_name, random_seed=1))
    assert ours == sglangs
    assert ours["dllm_algorithm"] == class_name
    assert ours["max_running_requests"] == DEFAULT_MAX_RUNNING_REQUESTS
    assert ours["cuda_graph_config"].decode.backend == ours["cuda_graph_config"].prefill.backend == "disabled"
    assert ours["disable_cuda_graph"] is True and ours["disable_overlap_schedule"] is True
    assert json.loads(ours["json_model_override_args"]) == {"ar_mode": False}
    assert ours["dllm_algorithm_config"] == DEFAULT_CONFIG
    # The user's own choices stand.
    mine = _fields(_resolved(tmp_path, device, {}, dllm_algorithm=class_name, max_running_requests=3))
    assert mine["max_running_requests"] == 3
    if device == "cuda":
        # Negative control: SGLang captures graphs for this device when no diffusion mode runs,
        # so the 'disabled' above is the hook's decision.
        ar = _fields(_resolved(tmp_path, device, {"algorithm": "ar"}))
        assert ar["cuda_graph_config"].decode.backend != "disabled"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quadratic_runs_only_on_attention_paths_that_draw_its_pattern(tmp_path, device):
    """A backend that cannot draw a quadratic round's pattern would run its block rows
    bidirectionally (not AR): SGLang is told to use `nemodiff` instead; torch_native stays.
    Negative control: LinearSpec keeps the user's triton."""
    for asked in ("triton", "flashinfer", None):
        view = _resolved(tmp_path, device, {"algorithm": "quadratic"}, attention_backend=asked)
        # unset on CPU: SGLang's CPU default, torch_native, which draws it too
        assert view.attention_backend == ("torch_native" if asked is None and device == "cpu"
                                          else "nemodiff"), asked
        assert view.prefill_attention_backend in (None, "nemodiff")
        assert view.decode_attention_backend in (None, "nemodiff")
    assert _resolved(tmp_path, device, {"algorithm": "quadratic"},
                     attention_backend="torch_native").attention_backend == "torch_native"
    assert _resolved(tmp_path, device, {"algorithm": "linearspec"},
                     attention_backend="triton").attention_backend == "triton"


def test_cuda_graphs_setting_keeps_graphs_on_the_nemodiff_backend(tmp_path):
    """`cuda_graphs: true` (graph-safe passes, model.py): SGLang's graphs for --device cuda stay
    on (negative control: without the setting the hook disables them, test above), the backend
    is nemodiff (another asked for is replaced, as SGLang does for an algorithm's required
    backend; the model also refuses one at load)."""
    config = tmp_path / "graphs.yaml"
    config.write_text("cuda_graphs: true\n")
    view = _resolved(tmp_path, "cuda", {"algorithm": "linearspec", "algorithm_config": str(config)})
    assert view.cuda_graph_config.decode.backend != "disabled"
    assert view.attention_backend == "nemodiff"
    asked = _resolved(tmp_path, "cuda", {"algorithm": "linearspec", "algorithm_config": str(config)},
                      attention_backend="triton", decode_attention_backend="flashinfer")
    assert asked.attention_backend == asked.decode_attention_backend == "nemodiff"
    assert asked.prefill_attention_backend in (None, "nemodiff")
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        AlgorithmSettings.from_mapping({"cuda_graphs": "yes"})


def test_settings_yaml(tmp_path):
    assert load_settings(None) == AlgorithmSettings()
    assert AlgorithmSettings().threshold == 0.9 and AlgorithmSettings().block_size == "auto"
    good = tmp_path / "good.yaml"
    good.write_text("threshold: 0.8\nuse_lora: false\n")
    assert load_settings(str(good)).threshold == 0.8
    bad = tmp_path / "bad.yaml"
    bad.write_text("treshold: 0.8\n")
    with pytest.raises(ValueError, match="unknown setting.*treshold"):
        load_settings(str(bad))
    (tmp_path / "range.yaml").write_text("threshold: 1.5\n")
    with pytest.raises(ValueError, match="threshold"):
        load_settings(str(tmp_path / "range.yaml"))
    assert AlgorithmSettings().denoise_lora is False  # FastDiffuser: base-weight denoising
    assert AlgorithmSettings.from_mapping({"denoise_lora": True}).denoise_lora is True
    with pytest.raises(ValueError, match="denoise_lora needs the draft adapter"):
        AlgorithmSettings.from_mapping({"denoise_lora": True, "use_lora": False})


def test_missing_hook_target_fails_with_one_clear_message():
    from sglang_nemodiff.patches import PatchTargetMissing, check_target, patch_modules

    for module in patch_modules():  # every declared target exists in the installed SGLang
        for target in module.TARGETS:
            check_target(target)
    with pytest.raises(PatchTargetMissing, match=r"sglang\.srt\.dllm\.config\.NoSuchThing.*"
                                                 r"sglang==0\.5\.23"):
        check_target("sglang.srt.dllm.config.NoSuchThing")


def test_register_is_idempotent_and_registers_everything():
    code = (
        "import sglang_nemodiff as p; p.register(); p.register()\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry; HookRegistry.apply_hooks()\n"
        "from sglang.srt.models.registry import ModelRegistry\n"
        "from sglang.srt.dllm.algorithm import algo_name_to_cls\n"
        "from transformers import AutoConfig\n"
        "assert 'NemotronLabsDiffusionModel' in ModelRegistry.models\n"
        "assert {'NemodiffFastDiffuser', 'NemodiffLinearSpec'} <= set(algo_name_to_cls)\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'nemotron_labs_diffusion' in CONFIG_MAPPING\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_light_import():
    """Importing the package (and the kernels/reference) does not import SGLang."""
    code = ("import sys, sglang_nemodiff, sglang_nemodiff.reference, sglang_nemodiff.kernels\n"
            "print(any(m == 'sglang' or m.startswith('sglang.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_vllm_stub_only_without_vllm(monkeypatch, tmp_path):
    """Both branches, whether or not this machine has vllm: without it `apply()` installs the
    stand-in (whose op refuses to run); with it (a stand-in package on sys.path here) it leaves
    vllm alone."""
    import importlib
    import importlib.util

    from sglang_nemodiff.patches import vllm_stub

    names = ("vllm", "vllm._custom_ops")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    real_find_spec = importlib.util.find_spec
    try:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
        vllm_stub.apply()
        ops = importlib.import_module("vllm._custom_ops")
        assert "CPU shim" in ops.__doc__
        with pytest.raises(NotImplementedError):
            ops.rotary_embedding()

        for name in names:
            sys.modules.pop(name, None)
        package = tmp_path / "vllm"
        package.mkdir()
        (package / "__init__.py").write_text('"""installed vllm"""\n')
        (package / "_custom_ops.py").write_text("")
        monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
        monkeypatch.syspath_prepend(str(tmp_path))
        vllm_stub.apply()
        assert "vllm" not in sys.modules  # nothing installed in its place
        assert importlib.import_module("vllm._custom_ops").__file__ == str(package / "_custom_ops.py")
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_graph_pass_guard_raises_on_another_pass_kind():
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_nemodiff.model import GraphPassGuard, PassOptions

    batch = SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND)
    options = PassOptions()
    assert options.resolve(batch).name == "bidirectional"
    assert options.set(causal=False, adapter=True).name == "draft"
    assert options.resolve(SimpleNamespace(forward_mode=ForwardMode.EXTEND)).name == "draft"
    options.clear()
    assert options.resolve(SimpleNamespace(forward_mode=ForwardMode.EXTEND)).name == "causal"
    assert options.set(causal=True).name == "causal"
    assert PassOptions(ar_mode=True).set(causal=False, adapter=True).name == "causal"
    assert PassOptions(causal_seed=True).resolve(batch).name == "seed_causal"
    guard = GraphPassGuard()
    guard.check(ForwardMode.DLLM_EXTEND, "causal")  # nothing captured: nothing to check
    guard.record(ForwardMode.DLLM_EXTEND, "bidirectional")
    guard.check(ForwardMode.DLLM_EXTEND, "bidirectional")
    with pytest.raises(RuntimeError, match="captured for a bidirectional DLLM_EXTEND pass"):
        guard.check(ForwardMode.DLLM_EXTEND, "causal")


def test_graph_safe_model_replays_only_its_captured_width():
    """A graph-safe model's graph serves every pass kind but one round width: a batch of another
    width (another block size, a quadratic round, AR steps) runs eagerly; an eager model keeps
    the kind guard."""
    from types import SimpleNamespace

    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_nemodiff.model import GraphPassGuard, PassOptions
    from sglang_nemodiff.patches.cuda_graph_guard import can_run_graph

    def runner(graph_safe):
        model = SimpleNamespace(pass_options=PassOptions(graph_safe=graph_safe),
                                graph_guard=GraphPassGuard())
        return SimpleNamespace(model_runner=SimpleNamespace(model=model), captured_req_width=16)

    def batch(width):
        return SimpleNamespace(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=3,
                               input_ids=torch.zeros(3 * width, dtype=torch.long))

    def original(runner, forward_batch):
        return True

    safe = runner(True)
    assert can_run_graph(original, safe, batch(16))
    assert not can_run_graph(original, safe, batch(8)) and not can_run_graph(original, safe, batch(272))
    assert not can_run_graph(lambda r, b: False, safe, batch(16))
    eager = runner(False)
    eager.model_runner.model.graph_guard.record(ForwardMode.DLLM_EXTEND, "causal")
    eager.model_runner.model.pass_options.set(causal=False, adapter=True)
    with pytest.raises(RuntimeError, match="captured for a causal"):
        can_run_graph(original, eager, batch(16))


def test_prompt_id_validation_messages():
    from sglang_nemodiff.patches.request_validation import out_of_vocab_message

    assert out_of_vocab_message([0, 5, 383], 384) is None
    assert out_of_vocab_message([100], 384) is None  # the mask id is a valid prompt token
    assert "input_ids[2] = 384" in out_of_vocab_message([1, 2, 384], 384)
    assert "input_ids[0] = -1" in out_of_vocab_message([-1], 384)
    assert "not an integer" in out_of_vocab_message([1, "x"], 384)


def test_cpu_thread_binding_spec():
    from sglang_nemodiff.patches.cpu_threads import parse_cpu_ids

    assert parse_cpu_ids("1") == [1]
    assert parse_cpu_ids("0-3") == [0, 1, 2, 3]
    assert parse_cpu_ids("0,2,4-5") == [0, 2, 4, 5]
    assert parse_cpu_ids([3, 1]) == [1, 3]


@pytest.mark.parametrize("causal", [True, False])
def test_torch_native_extend_without_padding_equals_stock(causal):
    """patches/torch_native_extend.py computes the stock torch_native extend attention (which pads
    every request's queries to its whole sequence) with only the extend rows."""
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sglang_nemodiff.patches.torch_native_extend import sdpa_extend

    torch.manual_seed(0)
    H, D, pool = 4, 8, 64
    prefix, extend = torch.tensor([5, 0, 17]), torch.tensor([3, 6, 1])
    seq = prefix + extend
    k_cache, v_cache = torch.randn(pool, H, D), torch.randn(pool, H, D)
    req_to_token = torch.stack([torch.randperm(pool)[:32] for _ in range(3)])
    query = torch.randn(int(extend.sum()), H, D)
    args = (k_cache, v_cache, req_to_token, torch.arange(3), seq, prefix, extend)
    stock = TorchNativeAttnBackend._run_sdpa_forward_extend(None, query, torch.zeros_like(query), *args,
                                                            scaling=0.3, causal=causal)
    ours = sdpa_extend(query, torch.zeros_like(query), *args, scaling=0.3, causal=causal)
    assert torch.allclose(ours, stock, atol=1e-5)
    if causal:  # and the mask matters: without it the rows differ
        assert not torch.allclose(sdpa_extend(query, torch.zeros_like(query), *args, scaling=0.3), stock, atol=1e-3)


def test_penalizers_apply_in_one_fixed_order():
    """SGLang builds the penalizer orchestrator from a set of classes (order = their hashes, which
    differ per process); patches/penalizer_order.py sorts them so that the additive penalties come
    before the repetition penalty in every process. A scrambled set comes out in the fixed order,
    and the order matters: frequency then repetition differs from repetition then frequency."""
    import random

    import torch

    import sglang.srt.sampling.penaltylib as penaltylib
    from sglang.srt.sampling.penaltylib.orchestrator import BatchedPenalizerOrchestrator
    from sglang_nemodiff.patches import penalizer_order

    classes = [penaltylib.BatchedRepetitionPenalizer, penaltylib.BatchedMinNewTokensPenalizer,
               penaltylib.BatchedPresencePenalizer, penaltylib.BatchedFrequencyPenalizer]
    class Batch:  # what the orchestrator reads of a ScheduleBatch (weakly referenced)
        reqs, device = [], "cpu"

    batch = Batch()
    for seed in range(4):
        random.Random(seed).shuffle(classes)
        orchestrator = BatchedPenalizerOrchestrator.__new__(BatchedPenalizerOrchestrator)
        penalizer_order.orchestrator_init(BatchedPenalizerOrchestrator.__init__, orchestrator,
                                          vocab_size=8, batch=batch, penalizers=list(classes))
        assert [c.__name__ for c in orchestrator.penalizers] == list(penalizer_order.ORDER)
    logit, frequency, repetition = torch.tensor(2.9), 0.3, 1.1
    assert float((logit - frequency) / repetition) != pytest.approx(float(logit / repetition - frequency))


def test_quadratic_round_shape_is_decided_once_from_the_yaml(tmp_path):
    """The quadratic DllmConfig: `auto` plans rounds up to b = 16 with 4 groups (what the
    scheduler reserves per request: 80 slots, not a dense round's 272); a fixed block_size keeps
    its layout, sparse or dense; `quadratic_groups` under `auto` is refused by name."""
    from sglang.srt.dllm.config import DllmConfig

    from sglang_nemodiff.patches.dllm_config import round_slots

    def config(yaml_text):
        path = tmp_path / f"q{abs(hash(yaml_text))}.yaml"
        path.write_text(yaml_text)
        view = _resolved(tmp_path, "cpu", {"algorithm": "quadratic", "algorithm_config": str(path)})
        return DllmConfig.from_server_args(view)

    auto = config("block_size: auto\n")
    assert (auto.block_size, auto.quadratic.n_groups, round_slots(auto)) == (16, 4, 80)
    dense = config("block_size: 8\n")
    assert (dense.block_size, dense.quadratic.n_groups, round_slots(dense)) == (8, 8, 72)
    sparse = config("block_size: 16\nquadratic_groups: 2\n")
    assert round_slots(sparse) == 48
    with pytest.raises(ValueError, match="quadratic_groups"):
        config("block_size: auto\nquadratic_groups: 2\n")
