"""CPU shim: SGLang 0.5.23 builds every tensor-parallel group with a PyNccl communicator, which
needs CUDA. When the group's backend is gloo (`--device cpu`), build it without the CUDA-only
communicators so `--tp N` runs on CPU over torch.distributed/gloo. GPU groups are untouched."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.distributed.parallel_state.init_model_parallel_group",)


def init_model_parallel_group(original, group_ranks, local_rank, backend, *args, **kwargs):
    if backend == "gloo" and not args:
        for name in ("use_pynccl", "use_custom_allreduce", "use_mscclpp",
                     "use_torch_symm_mem_allreduce"):
            kwargs[name] = False
    return original(group_ranks, local_rank, backend, *args, **kwargs)


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_model_parallel_group, HookType.AROUND)
