"""LinearSpec (NLD_SPEC §3): one bidirectional draft pass fills every mask (draft LoRA on), one
causal verify pass (base weights) accepts the longest prefix of drafts equal to the causal argmax;
the argmax after it is the bonus token and next seed. Exactly 2 forwards per block, lossless
at temperature 0: every emitted token is a causal argmax."""

from __future__ import annotations

from sglang_nemodiff import kernels
from sglang_nemodiff.algorithms.base import NLDBlockAlgorithm, confidence_argmax


class NemodiffLinearSpec(NLDBlockAlgorithm):
    mode_name = "linearspec"

    def fill_block(self, model_runner, forward_batch, block):
        out = self.forward_pass(model_runner, forward_batch, causal=False, draft_lora=True)
        draft, _ = confidence_argmax(out.logits_output.full_logits.view(*block.shape, -1), self.mask_id)
        block[:, 1:] = draft[:, 1:]
        return 1

    def accept(self, block, causal_argmax):
        # Draft i (i >= 1) is accepted while it equals the causal argmax of slot i-1.
        accepted, _ = kernels.linearspec_accept(block, causal_argmax)
        return accepted + 1, accepted


Algorithm = NemodiffLinearSpec
