"""`--attention-backend nemodiff` (sglang_nemodiff/attention_backend.py) on the stock CLI.

- The name joins SGLang's accepted choices through `add_attention_backend_choices` (the in-place
  `ATTENTION_BACKEND_CHOICES.extend` that `--attention-backend`, `--prefill-attention-backend`
  and `--decode-attention-backend` validate against) and its factory joins the backend registry
  `ATTENTION_BACKENDS` through `register_attention_backend`. Both run in every process.
- dLLM mode keeps it: `_dllm_attention_backend` (arg_groups/overrides.py) leaves a backend alone
  when it is in the algorithm's `supported_attention_backends` (NLDBlockAlgorithm lists
  "nemodiff") and CUDA graphs are off on CPU (server_args.py sets that for --device cpu).
- CUDA graphs are turned off with it, as SGLang does for torch_native (the decode path and the
  metadata are torch_native's, which has no CUDA-graph support): an AFTER hook on
  `handle_attention_backend_compatibility` declares the same resolution.
- `get_last_loc` (paged allocation; dLLM forces page size = block size) picks a Triton kernel for
  every backend but torch_native/ascend. Triton cannot run on the CPU outside the interpreter, so
  with nemodiff on a CPU tensor and TRITON_INTERPRET unset it takes SGLang's torch version.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = (
    "sglang.srt.arg_groups.choices.add_attention_backend_choices",
    "sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend",
    "sglang.srt.mem_cache.allocation.get_last_loc",
    "sglang.srt.mem_cache.allocation.get_last_loc_torch",
    "sglang.srt.mem_cache.allocation.attention_backends",
    "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility",
    "sglang.srt.arg_groups.attention_hook.declare_resolution",
    "sglang.srt.arg_groups.attention_hook.resolved_view",
    "sglang.srt.arg_groups.attention_hook.resolving_view",
    "sglang.srt.arg_groups.attention_hook.with_phase",
    "sglang.srt.arg_groups.attention_hook.Phase",
    "sglang.srt.arg_groups.attention_hook.Backend",
    "sglang.srt.arg_groups.attention_hook.logger",
)
GET_LAST_LOC = "sglang.srt.mem_cache.allocation.get_last_loc"
ATTENTION_COMPATIBILITY = ("sglang.srt.arg_groups.attention_hook."
                           "handle_attention_backend_compatibility")

BACKEND_NAME = "nemodiff"  # == sglang_nemodiff.attention_backend.BACKEND_NAME


def create_backend(model_runner):
    # Imported here: the backend module imports SGLang's layers, which the launcher never needs.
    from sglang_nemodiff.attention_backend import NemodiffAttnBackend

    return NemodiffAttnBackend(model_runner)


def disable_cuda_graphs(result, server_args):
    from sglang.srt.arg_groups import attention_hook as hook

    if hook.resolved_view(server_args).attention_backend != BACKEND_NAME:
        return result
    hook.logger.warning("Cuda graph is disabled because of using the nemodiff attention backend")
    for phase in (hook.Phase.DECODE, hook.Phase.PREFILL):
        config = hook.resolving_view(server_args).cuda_graph_config
        if getattr(config, phase).backend == hook.Backend.DISABLED:
            continue
        hook.declare_resolution(
            server_args, "_nemodiff_attention_backend",
            cuda_graph_config=hook.with_phase(config, phase, backend=hook.Backend.DISABLED))
    return result


def get_last_loc(original, req_to_token, req_pool_indices_tensor, prefix_lens_tensor):
    from sglang.srt.mem_cache import allocation

    from sglang_nemodiff.kernels.dispatch import triton_interpreting

    if (req_to_token.device.type == "cpu" and not triton_interpreting()
            and BACKEND_NAME in allocation.attention_backends()):
        return allocation.get_last_loc_torch(req_to_token, req_pool_indices_tensor,
                                             prefix_lens_tensor)
    return original(req_to_token, req_pool_indices_tensor, prefix_lens_tensor)


def apply() -> None:
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_backend)
    HookRegistry.register(GET_LAST_LOC, get_last_loc, HookType.AROUND)
    HookRegistry.register(ATTENTION_COMPATIBILITY, disable_cuda_graphs, HookType.AFTER)
