"""Triton kernels (and their PyTorch references) for NLD serving.

Self-contained: imports only torch and triton (never sglang), so the kernels and
launch/bench_kernels.py run on a GPU machine without SGLang installed.
"""

from .dispatch import select, triton_interpreting, use_triton
from .speculative import speculative_accept, speculative_accept_reference
from .confidence import (
    confidence_argmax,
    confidence_argmax_reference,
    fastdiffuser_commit,
    fastdiffuser_commit_reference,
    linearspec_accept,
    linearspec_accept_reference,
)
from .structured_attention import (
    BLOCK_BIDIRECTIONAL,
    CAUSAL,
    QUADRATIC,
    SEED_CAUSAL,
    attention_launch_shape,
    build_mask,
    plan_num_splits,
    structured_attention,
    structured_attention_reference,
)

__all__ = [
    "select",
    "triton_interpreting",
    "use_triton",
    "speculative_accept",
    "speculative_accept_reference",
    "CAUSAL",
    "BLOCK_BIDIRECTIONAL",
    "QUADRATIC",
    "SEED_CAUSAL",
    "build_mask",
    "plan_num_splits",
    "attention_launch_shape",
    "structured_attention",
    "structured_attention_reference",
    "confidence_argmax",
    "confidence_argmax_reference",
    "fastdiffuser_commit",
    "fastdiffuser_commit_reference",
    "linearspec_accept",
    "linearspec_accept_reference",
]
