"""CPU shim: honour SGLANG_CPU_OMP_THREADS_BIND on CPUs without AMX.

SGLang 0.5.23 binds each CPU rank's OpenMP threads to its cores only through the CPU sgl-kernel,
which needs AMX (or arm64); elsewhere it logs "init_cpu_threads_env ... is disabled" and every
rank keeps torch's default (all cores). With `--tp 2` that is 2 x all-cores threads, and a server
sharing its machine spins its OpenMP threads against the other load: a 32-token forward of a
small model then takes milliseconds per matmul instead of microseconds. When the variable is
set explicitly, pin the rank to its cores and use one torch thread per core, as the sgl-kernel
path would. Unset, nothing changes."""

from __future__ import annotations

import logging
import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger("sglang_nemodiff")

TARGETS = ("sglang.srt.distributed.bootstrap._init_cpu_threads_env",
           "sglang.srt.distributed.bootstrap._is_cpu_amx_available",
           "sglang.srt.distributed.bootstrap._is_cpu_arm64")


def parse_cpu_ids(spec) -> list[int]:
    """"0", "0-3", "0,2,4-5" or a list of ints -> sorted core ids."""
    if isinstance(spec, (list, tuple)):
        return sorted(int(c) for c in spec)
    cpus = set()
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return sorted(cpus)


def init_cpu_threads_env(original, *args, local_omp_cpuid=None, **kwargs):
    from sglang.srt.distributed import bootstrap

    result = original(*args, local_omp_cpuid=local_omp_cpuid, **kwargs)
    explicit = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", "all") != "all"
    if (explicit and local_omp_cpuid
            and not (bootstrap._is_cpu_amx_available or bootstrap._is_cpu_arm64)):
        import torch

        cpus = parse_cpu_ids(local_omp_cpuid)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
        logger.info("sglang_nemodiff: CPU rank bound to cores %s, %d torch thread(s)", cpus, len(cpus))
    return result


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_cpu_threads_env, HookType.AROUND)
