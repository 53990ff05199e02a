"""Every touch of SGLang internals, one module per hooked target, applied in memory (no file on
disk is edited). Each module names its TARGETS; `apply_all` first checks that every target still
exists in the installed SGLang and otherwise stops with one clear message."""

from __future__ import annotations

import importlib
import pkgutil

SUPPORTED_SGLANG = "0.5.23"

# Patch modules, in application order.
MODULES = (
    "vllm_stub",
    "cpu_parallel_groups",
    "cpu_threads",
    "server_args_cli",
    "engine_kwargs",
    "dllm_config",
    "dllm_req_fill_ids",
    "dllm_block_positions",
    "dllm_round_requests",
    "dllm_arrivals",
    "dllm_scheduler_result",
    "dllm_scheduler_stash",
    "dllm_scheduler_finish",
    "dllm_kv_pressure",
    "dllm_grammar_queue",
    "request_validation",
    "penalizer_order",
    "cuda_graph_guard",
    "output_stats",
    "attention_backend_registry",
    "torch_native_extend",
)


class PatchTargetMissing(RuntimeError):
    pass


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        return "unknown"


def check_target(target: str) -> None:
    try:
        obj_path, _, attr = target.rpartition(".")
        owner = pkgutil.resolve_name(obj_path)
        getattr(owner, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PatchTargetMissing(
            f"sglang_nemodiff hooks `{target}`, which the installed sglang=={_sglang_version()} "
            f"does not have ({type(exc).__name__}: {exc}). sglang_nemodiff supports "
            f"sglang=={SUPPORTED_SGLANG} exactly: `pip install sglang=={SUPPORTED_SGLANG}`."
        ) from exc


def patch_modules():
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]


def apply_all() -> None:
    modules = patch_modules()
    for module in modules:
        for target in getattr(module, "TARGETS", ()):
            check_target(target)
    for module in modules:
        module.apply()
