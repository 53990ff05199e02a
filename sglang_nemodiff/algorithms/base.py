"""What FastDiffuser and LinearSpec share inside SGLang's dLLM scheduler.

Invariant between rounds: the KV cache holds every committed token but the last one, the *seed*.
- The causal prefill (an EXTEND batch, chunked like any prefill) encodes the prompt; the argmax of
  its last position is the first seed, emitted at once (as AR would).
- Each round is one DLLM_EXTEND batch over the block `[seed, MASK × (B-1)]` at the seed's position.
  The algorithm fills it with bidirectional passes, then runs ONE causal pass over the block, which
  writes causal KV for all B slots. The first `keep` slots' KV is kept (the scheduler patch frees
  the rest), and `keep` tokens are emitted: block[1:keep] plus the causal argmax at slot keep-1,
  the next seed. FastDiffuser keeps the whole block; LinearSpec the seed plus accepted drafts.
Every forward is counted per request and reported in meta_info (`nemodiff_forwards`).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import torch

from sglang.srt.dllm.algorithm.base import DllmAlgorithm, DllmRunOutput
from sglang.srt.dllm.config import DllmConfig
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

from sglang_nemodiff import kernels
from sglang_nemodiff.config import ARCHITECTURE
from sglang_nemodiff.settings import AlgorithmSettings


def confidence_argmax(logits: torch.Tensor, mask_id: int):
    """[..., V] logits -> argmax with the mask id excluded, and its probability with the mask id
    kept in the softmax: the fused one-pass Triton kernel on GPU (or under TRITON_INTERPRET=1),
    its PyTorch reference on CPU."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        token, prob = kernels.confidence_argmax(flat, mask_id)
    else:
        token, prob = kernels.confidence_argmax_reference(flat, mask_id)
    return token.view(logits.shape[:-1]), prob.view(logits.shape[:-1])


class NLDBlockAlgorithm(DllmAlgorithm):
    supported_architectures = (ARCHITECTURE,)
    requires_separate_context_encoding = True
    supported_attention_backends = ("torch_native", "triton", "flashinfer", "fa3", "nemodiff")
    # Both modes decide per block from argmaxes; request features they cannot honour.
    mode_name = "diffusion"

    def __init__(self, config: DllmConfig):
        super().__init__(config)
        self.settings = AlgorithmSettings.from_mapping(config.algorithm_config)
        self.fdfo = False  # a round always resolves its block

    @classmethod
    def validate_request(cls, req) -> Optional[str]:
        sp = req.sampling_params
        unsupported = []
        if sp.temperature > 0 and not (sp.top_k == 1):
            unsupported.append(f"temperature={sp.temperature} (only greedy decoding, temperature 0)")
        for name, value, default in (
            ("frequency_penalty", sp.frequency_penalty, 0.0),
            ("presence_penalty", sp.presence_penalty, 0.0),
            ("repetition_penalty", sp.repetition_penalty, 1.0),
            ("min_new_tokens", sp.min_new_tokens, 0),
            ("min_p", sp.min_p, 0.0),
        ):
            if value != default:
                unsupported.append(name)
        if sp.logit_bias:
            unsupported.append("logit_bias")
        for name in ("json_schema", "regex", "ebnf", "structural_tag"):
            if getattr(sp, name, None) is not None:
                unsupported.append(f"{name} (constrained decoding)")
        if req.return_logprob or req.logprob.top_logprobs_num or req.logprob.token_ids_logprob:
            unsupported.append("logprobs")
        if req.custom_logit_processor:
            unsupported.append("custom_logit_processor")
        if (sp.n or 1) > 1:
            unsupported.append(f"n={sp.n} (parallel sampling)")
        if sp.max_new_tokens == 0:
            unsupported.append("max_new_tokens=0 (prompt scoring, e.g. sgl.select)")
        if not unsupported:
            return None
        return (f"--algorithm {cls.mode_name} does not support: {', '.join(unsupported)}. "
                "Serve the model with --algorithm ar for these features.")

    def init_step_state(self, forward_batch: ForwardBatch) -> List[Any]:
        return [None] * forward_batch.batch_size

    def run(self, model_runner, forward_batch: ForwardBatch,
            algo_states: Optional[List[Any]] = None) -> DllmRunOutput:
        bs = forward_batch.batch_size
        if not forward_batch.forward_mode.is_dllm_extend():
            # Causal prefill of uncached committed tokens; its last argmax is the seed.
            if forward_batch.input_ids.numel() == 0:
                return None, [], None, None, False
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            seeds = out.logits_output.next_token_logits.argmax(dim=-1).tolist()
            return out.logits_output, seeds, None, [{"forwards": 1}] * bs, out.can_run_graph

        if not hasattr(self, "eos_id"):
            eos = model_runner.model_config.hf_config.eos_token_id
            self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        block = forward_batch.input_ids.view(bs, self.block_size)
        forwards = self.fill_block(model_runner, forward_batch, block)
        # One causal pass over the finished block: causal KV for every slot, argmax per slot.
        out = self.forward_pass(model_runner, forward_batch, causal=True)
        causal_argmax = out.logits_output.full_logits.view(bs, self.block_size, -1).argmax(-1)
        keep, accepted = self.accept(block, causal_argmax)
        bonus = causal_argmax.gather(1, (keep - 1)[:, None])
        emitted = torch.cat([block[:, 1:], bonus], dim=1)
        keep_list = keep.tolist()
        emitted_list = emitted.tolist()
        accepted_list = accepted.tolist() if accepted is not None else [None] * bs
        tokens = [
            torch.tensor(emitted_list[i][: keep_list[i] - 1] + [emitted_list[i][-1]])
            for i in range(bs)
        ]
        stats = [{"forwards": forwards + 1, "keep": keep_list[i], "accepted": accepted_list[i]}
                 for i in range(bs)]
        return out.logits_output, tokens, None, stats, out.can_run_graph

    @staticmethod
    def forward_pass(model_runner, forward_batch, causal: bool, draft_lora: bool = False):
        options = model_runner.model.pass_options
        options.causal, options.draft_lora = causal, draft_lora
        try:
            return model_runner.forward(forward_batch, pp_proxy_tensors=None)
        finally:
            options.causal, options.draft_lora = None, False

    # Subclasses: fill `block` [bs, B] in place with bidirectional passes; return forwards used.
    def fill_block(self, model_runner, forward_batch, block):
        raise NotImplementedError

    # Subclasses: slots to keep per request (>= 1, includes the seed) and accepted drafts (or None).
    def accept(self, block, causal_argmax):
        raise NotImplementedError
