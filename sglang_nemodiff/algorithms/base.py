"""What FastDiffuser and LinearSpec share inside SGLang's dLLM scheduler.

Invariant between rounds: the KV cache holds every committed token but the last one, the *seed*.
- The causal prefill (an EXTEND batch, chunked like any prefill) encodes the prompt; the token
  after its last position (argmax, or a sample at temperature > 0) is the first seed, emitted at
  once, as AR would.
- Each round is one DLLM_EXTEND batch over the block `[seed, MASK x (B-1)]` at the seed's
  position; B is the round's (patches/dllm_req_fill_ids.py, block_policy.py), the same for
  every request of the batch. The algorithm fills it with bidirectional passes, then runs ONE causal pass over the
  block, which writes causal KV for all B slots. The first `keep` slots' KV is kept (the
  scheduler patch frees the rest) and `keep` tokens are emitted: block[1:keep] plus one token
  from the causal pass at slot keep-1, the next seed. FastDiffuser keeps the whole block;
  LinearSpec the seed plus its accepted drafts.
The requests of the batch (`round_reqs`, set by patches/dllm_round_requests.py) give each
request's sampling parameters; every forward is counted per request (`RoundResult`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from sglang.srt.dllm.algorithm.base import DllmAlgorithm, DllmRunOutput
from sglang.srt.dllm.config import DllmConfig
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms import emits_first_token
from sglang_nemodiff.algorithms.ar_steps import run_ar_steps
from sglang_nemodiff.algorithms.grammar import mask_next_slot
from sglang_nemodiff.algorithms.sampling import BatchSampling, sample_from
from sglang_nemodiff.algorithms.timing import ForwardTimer
from sglang_nemodiff.config import ARCHITECTURE
from sglang_nemodiff.round_plan import RoundPlan, RoundRecord
from sglang_nemodiff.settings import AlgorithmSettings
from sglang_nemodiff.stats import RoundResult

logger = logging.getLogger("sglang_nemodiff")


def masked_confidence_argmax(logits: torch.Tensor, mask_id: int):
    """[..., V] logits -> argmax with the mask id excluded, and its probability with the mask id
    kept in the softmax (the fused kernel where Triton runs, its PyTorch reference elsewhere)."""
    flat = logits.reshape(-1, logits.shape[-1])
    token, prob = kernels.select(kernels.confidence_argmax, kernels.confidence_argmax_reference,
                                 flat)(flat, mask_id)
    return token.view(logits.shape[:-1]), prob.view(logits.shape[:-1])


def set_first_token_logprobs(logits_output, logprobs: list, sampling: BatchSampling) -> None:
    """Fill the LogitsProcessorOutput fields SGLang's prefill result path reads for the first
    output token (one entry per request; placeholders for requests that want none)."""
    def top(lp, part):
        return lp.top_logprobs[0][part] if lp and lp.top_logprobs else []

    logits_output.next_token_logprobs = torch.tensor(
        [lp.token_logprobs[0] if lp else 0.0 for lp in logprobs])
    logits_output.next_token_top_logprobs_val = [torch.tensor(top(lp, 0)) for lp in logprobs]
    logits_output.next_token_top_logprobs_idx = [torch.tensor(top(lp, 1), dtype=torch.int64)
                                                 for lp in logprobs]
    logits_output.next_token_token_ids_logprobs_val = [
        torch.tensor(lp.ids_logprobs[0] if lp and lp.ids_logprobs else []) for lp in logprobs]
    logits_output.next_token_token_ids_logprobs_idx = [
        entry[1] if entry is not None else None for entry in sampling.logprobs]


@dataclass
class BlockFill:
    """What a mode's bidirectional passes produced for the block."""

    forwards: int  # bidirectional passes run
    row_forwards: Optional[List[int]] = None  # those each request took part in (default: all)
    sampled_rows: Optional[torch.Tensor] = None  # rows that sampled (temperature > 0)
    draft_probs: Optional[torch.Tensor] = None  # LinearSpec: q of those rows' drafts [r, B-1, V]
    commit_logits: Optional[torch.Tensor] = None  # FastDiffuser: logits that committed each slot
    grammar: Optional[dict] = None  # LinearSpec: row -> (allowed [B, V] per verify slot, advanced)
    verify_logits: Optional[torch.Tensor] = None  # the adjusted verify logits the decision used


class NLDBlockAlgorithm(DllmAlgorithm):
    supported_architectures = (ARCHITECTURE,)
    requires_separate_context_encoding = True
    supported_attention_backends = ("torch_native", "triton", "flashinfer", "fa3", "nemodiff")
    mode_name = "diffusion"
    # Request features each mode serves (validate_request answers 400 for the others).
    supports_penalties = False
    supports_constrained_decoding = False

    def __init__(self, config: DllmConfig):
        super().__init__(config)
        self.settings = AlgorithmSettings.from_mapping(config.algorithm_config)
        self.round_reqs: Optional[list] = None  # set before every run (dllm_round_requests)
        # Whether a request has arrived at the scheduler (patches/dllm_arrivals.py; None where
        # rounds must not be cut): a round of AR steps ends after the step that sees one, when
        # its plan says enough steps were left for that to pay (`yield_steps_left`).
        self.arrivals = None
        self.eos_id: Optional[int] = None
        self.timer = ForwardTimer()
        # (query tokens, seconds) of the current round's forwards, when its plan is timed.
        self._forward_times: Optional[list] = None

    @classmethod
    def configure_server_args(cls, server_args) -> None:
        from sglang_nemodiff.algorithms.server_defaults import configure_server_args

        configure_server_args(server_args)

    @classmethod
    def unsupported_features(cls, req) -> List[str]:
        sp = req.sampling_params
        unsupported = []
        if not cls.supports_penalties:
            for name, value, default in (
                ("frequency_penalty", sp.frequency_penalty, 0.0),
                ("presence_penalty", sp.presence_penalty, 0.0),
                ("repetition_penalty", sp.repetition_penalty, 1.0),
                ("min_new_tokens", sp.min_new_tokens, 0),
            ):
                if value != default:
                    unsupported.append(name)
            if sp.logit_bias:
                unsupported.append("logit_bias")
        if not cls.supports_constrained_decoding:
            for name in ("json_schema", "regex", "ebnf", "structural_tag"):
                if getattr(sp, name, None) is not None:
                    unsupported.append(f"{name} (constrained decoding)")
        if req.custom_logit_processor:
            unsupported.append("custom_logit_processor")
        return unsupported

    @classmethod
    def validate_request(cls, req) -> Optional[str]:
        unsupported = cls.unsupported_features(req)
        if not unsupported:
            return None
        message = (f"--algorithm {cls.mode_name} does not support: {', '.join(unsupported)}. "
                   "Serve the model with --algorithm ar for these features.")
        logger.warning("[nemodiff] rejected request %s: %s", req.rid, message)
        return message

    def init_step_state(self, forward_batch: ForwardBatch) -> List[Any]:
        return [None] * forward_batch.batch_size

    def _sampling(self, forward_batch: ForwardBatch, vocab_size: int) -> BatchSampling:
        device = forward_batch.input_ids.device
        if self.round_reqs is None or len(self.round_reqs) != forward_batch.batch_size:
            return BatchSampling.greedy_batch(forward_batch.batch_size, device)
        return BatchSampling.from_reqs(self.round_reqs, vocab_size, device)

    def run(self, model_runner, forward_batch: ForwardBatch,
            algo_states: Optional[List[Any]] = None) -> DllmRunOutput:
        bs = forward_batch.batch_size
        vocab_size = model_runner.model_config.vocab_size
        sampling = self._sampling(forward_batch, vocab_size)
        if not forward_batch.forward_mode.is_dllm_extend():
            # Causal prefill of uncached committed tokens; the token after it is the seed.
            if forward_batch.input_ids.numel() == 0:
                return None, [], None, None, False
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            logits = sampling.adjust(out.logits_output.next_token_logits.unsqueeze(1))
            mask_next_slot(logits, sampling, 0)
            seeds = self.next_tokens(logits, sampling, stream=0)
            for row in sampling.grammar_rows:
                if emits_first_token(self.round_reqs[row]):
                    sampling.grammars[row].accept_token(int(seeds[row, 0]))
            if sampling.wants_logprobs:
                set_first_token_logprobs(out.logits_output,
                                         sampling.token_logprobs(logits, seeds, [1] * bs), sampling)
            # The block policy hears of it: the time until the next round is not a round's.
            record = RoundRecord(started=0.0, request_ids=()) if self.round_reqs is not None else None
            results = [RoundResult(passes=(("prefill", 1),), tokens=1, record=record)] * bs
            return out.logits_output, seeds[:, 0].tolist(), None, results, out.can_run_graph

        if self.eos_id is None:
            eos = model_runner.model_config.hf_config.eos_token_id
            self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        block_size = forward_batch.input_ids.numel() // bs
        plan = self.round_plan(bs, block_size)
        assert plan.slots == block_size, (plan, block_size)
        started = time.perf_counter()
        self._forward_times = [] if plan.timed else None
        block = forward_batch.input_ids.view(bs, block_size)
        if self.takes_ar_steps and plan.ar_steps:
            return self._ar_round(model_runner, forward_batch, block, sampling, started,
                                  plan.yield_steps_left)
        return self._block_round(model_runner, forward_batch, plan, sampling, started)

    def _block_round(self, model_runner, forward_batch: ForwardBatch, plan: RoundPlan,
                     sampling: BatchSampling, started: float) -> DllmRunOutput:
        """A round over `[seed, MASK x (B-1)]` blocks: the mode's bidirectional passes fill the
        block, one causal pass verifies it (quadratic.py replaces this with its one forward)."""
        bs, block_size = forward_batch.batch_size, plan.slots
        block = forward_batch.input_ids.view(bs, block_size)
        fill = self.fill_block(model_runner, forward_batch, block, sampling)
        # One causal pass over the finished block: causal KV for every slot, logits per slot.
        out = self.forward_pass(model_runner, forward_batch, causal=True)
        verify = out.logits_output.full_logits.view(bs, block_size, -1)
        keep, accepted, bonus = self.accept(block, verify, sampling, fill)
        keep_list = keep.tolist()
        accepted_list = accepted.tolist() if accepted is not None else [None] * bs
        record = self._round_record(started, block_size,
                                    tuple(accepted_list) if accepted is not None else None)
        tokens, logprobs = self._emitted(block, keep, bonus, sampling,
                                         lambda: self.emission_logits(verify, sampling, block, fill))
        row_forwards = fill.row_forwards or [fill.forwards] * bs
        results = [RoundResult(passes=((self.fill_pass, row_forwards[i]), (self.commit_pass, 1)),
                               tokens=keep_list[i], keep=keep_list[i],
                               accepted=accepted_list[i], block_size=block_size,
                               logprobs=logprobs[i], record=record)
                   for i in range(bs)]
        return out.logits_output, tokens, None, results, out.can_run_graph

    @staticmethod
    def _emitted(block, keep, bonus, sampling: BatchSampling, emission_logits):
        """Per request, the tokens a round emits (block[1:keep] and the bonus) and their
        logprobs (emission_logits() -> [bs, B, V], read only for logprob requests)."""
        keep_list, bonus_list, rows = keep.tolist(), bonus.tolist(), block.tolist()
        tokens = [torch.tensor(rows[i][1:keep_list[i]] + [bonus_list[i]]) for i in range(len(rows))]
        logprobs = [None] * len(rows)
        if sampling.wants_logprobs:
            # Emitted token j sits at slot j: block[j + 1] before the bonus, the bonus at keep-1.
            emitted = torch.cat([block[:, 1:], bonus[:, None]], 1)
            emitted.scatter_(1, (keep - 1)[:, None], bonus[:, None])
            logprobs = sampling.token_logprobs(emission_logits(), emitted, keep_list)
        return tokens, logprobs

    # The kinds of a block round's passes (stats.PASS_KINDS): the bidirectional ones that fill
    # the block, then the causal one.
    fill_pass = "draft"
    commit_pass = "verify"

    # Modes whose B = 1 is AR itself (LinearSpec) take it as AR steps (ar_steps.py).
    takes_ar_steps = False

    def round_plan(self, bs: int, block_size: int) -> RoundPlan:
        """The plan the scheduler placed this round's blocks with (one for every request of
        the round: patches/dllm_req_fill_ids.py); a fixed, untimed one when the requests are not
        known (unit tests drive the algorithms directly)."""
        reqs = self.round_reqs
        plan = getattr(reqs[0], "nemodiff_plan", None) if reqs and len(reqs) == bs else None
        return plan if plan is not None else RoundPlan.fixed(block_size)

    def _round_record(self, started: float, block_size: int, accepted: Optional[tuple],
                      groups: Optional[int] = None) -> Optional[RoundRecord]:
        """End of a round: its forward timings (read now: timing.py reads CUDA events once per
        round) and acceptance, for the block policy, if the plan asked for them."""
        if self._forward_times is None:
            return None
        times = self._forward_times
        self.timer.flush(lambda n, s: times.append((n, s)))
        self._forward_times = None
        return RoundRecord(started=started, request_ids=tuple(r.rid for r in self.round_reqs),
                           block_size=block_size, groups=groups, forward_times=tuple(times),
                           accepted=accepted)

    def _ar_round(self, model_runner, forward_batch, block, sampling: BatchSampling,
                  started: float, yield_steps_left: Optional[int]) -> DllmRunOutput:
        bs = block.shape[0]
        steps = run_ar_steps(self, model_runner, forward_batch, block, sampling, yield_steps_left)
        tokens, logprobs = self._emitted(block, steps.keep, steps.bonus, sampling, lambda: steps.logits)
        keep_list = steps.keep.tolist()
        record = self._round_record(started, 1, None)
        results = [RoundResult(passes=(("ar_step", keep_list[i]),), tokens=keep_list[i], keep=keep_list[i], accepted=0,
                               block_size=1, steps=keep_list[i], logprobs=logprobs[i],
                               record=record)
                   for i in range(bs)]
        return steps.logits_output, tokens, None, results, False

    @staticmethod
    def next_tokens(logits: torch.Tensor, sampling: BatchSampling, stream: int) -> torch.Tensor:
        """The token each slot of logits [bs, n, V] generates: the argmax for greedy requests, a
        sample from the request's distribution otherwise. Returns [bs, n]."""
        tokens = logits.argmax(-1)
        if not sampling.all_greedy:
            rows = (~sampling.greedy).nonzero().squeeze(1)
            chosen = sampling.select(rows)
            probs = chosen.probs(logits[rows])
            n, V = probs.shape[1], probs.shape[2]
            u = chosen.uniforms(n, stream, logits.device)
            tokens[rows] = sample_from(probs.reshape(-1, V), u.reshape(-1)).view(-1, n)
        return tokens

    def forward_pass(self, model_runner, forward_batch, causal: bool, draft_lora: bool = False,
                     layout=None):
        options = model_runner.model.pass_options
        options.set(causal, draft_lora, layout)
        times = self._forward_times  # None unless the plan is timed (a fixed B times nothing)
        started = self.timer.start(forward_batch.input_ids.is_cuda) if times is not None else None
        try:
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
        finally:
            options.clear()
        if started is not None:  # for the policy's cost table (timing.py: no per-forward sync)
            self.timer.stop(started, forward_batch.input_ids.numel(), lambda n, s: times.append((n, s)))
        return out

    def emission_logits(self, verify, sampling: BatchSampling, block, fill: BlockFill):
        """[bs, B, V] logits whose slot j produced emitted token j (for logprobs)."""
        return sampling.adjust(verify, block)

    # Subclasses: fill `block` [bs, B] in place with bidirectional passes.
    def fill_block(self, model_runner, forward_batch, block, sampling: BatchSampling) -> BlockFill:
        raise NotImplementedError

    # Subclasses: (keep [bs], accepted drafts [bs] or None, bonus token [bs]) from the verify
    # logits [bs, B, V]; keep >= 1 includes the seed.
    def accept(self, block, verify, sampling: BatchSampling, fill: BlockFill):
        raise NotImplementedError
