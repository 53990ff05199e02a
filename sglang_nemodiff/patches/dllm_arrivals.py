"""Let a round of AR steps end early when a request arrives, so it is admitted after one step.

SGLang's scheduler receives new requests between batches. A round of AR steps (algorithms/
ar_steps.py) is one batch of up to `ar_steps` decode steps, so a request that arrives during it
waits for the whole round before its prefill, where SGLang's own decode loop takes it after one
step (docs/perf-real.md: what it cost SmolLM2 at concurrency 16).
The scheduler hands the algorithm a probe (`Arrivals`) that looks at the scheduler's input
socket without receiving from it; the round ends after the step in which it saw a request, if
the plan says enough steps were left for that to pay (block_policy.py: steps_worth_a_round).

Only where one process decides alone: tensor-parallel ranks must run the same steps (rank 0
alone reads the socket), so under TP or PP the probe is not installed. Not while requests
already wait for room (the scheduler's waiting queue holds requests only when the dLLM queue is
full): a new one could not be admitted any sooner."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.patches.dllm_config import is_nemodiff_algorithm

TARGETS = ("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.init_diffusion_llm",)


class Arrivals:
    """Whether a request reached the scheduler's input since it last received."""

    def __init__(self, scheduler, socket):
        import zmq

        self.scheduler = scheduler
        self.socket = socket
        self.pollin = zmq.POLLIN  # asked after every AR step: nothing to look up there

    def __call__(self) -> bool:
        if self.scheduler.waiting_queue:
            return False
        return bool(self.socket.poll(0, self.pollin))


def arrivals_probe(scheduler):
    """The probe for this scheduler, or None where it must not cut rounds (see the docstring)."""
    import zmq

    args = scheduler.server_args
    socket = getattr(scheduler, "recv_from_tokenizer", None)
    if (args.tp_size != 1 or args.pp_size != 1 or args.enable_dp_attention
            or not isinstance(socket, zmq.Socket)):
        return None
    return Arrivals(scheduler, socket)


def init_diffusion_llm(original, scheduler):
    original(scheduler)
    config = scheduler.dllm_config
    if config is None or not is_nemodiff_algorithm(config.algorithm):
        return
    algorithm = getattr(scheduler.tp_worker, "dllm_algorithm", None)
    if hasattr(algorithm, "arrivals"):
        algorithm.arrivals = arrivals_probe(scheduler)


def apply() -> None:
    HookRegistry.register(TARGETS[0], init_diffusion_llm, HookType.AROUND)
