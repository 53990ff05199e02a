"""Plain-PyTorch oracle of the NLD forward and its generation modes, written from the
model's definition rather than from the serving code.

Independent of SGLang (imports torch, safetensors and the config class only), usable on CPU and GPU.
"""

from sglang_nemodiff.reference.model import KVCache, NLDReference
from sglang_nemodiff.reference.generate import (
    GenerationResult,
    ar_generate,
    fastdiffuser_generate,
    linearspec_generate,
)
from sglang_nemodiff.reference.quadratic import quadratic_generate, quadratic_layout

__all__ = [
    "KVCache",
    "NLDReference",
    "GenerationResult",
    "ar_generate",
    "fastdiffuser_generate",
    "linearspec_generate",
    "quadratic_generate",
    "quadratic_layout",
]
