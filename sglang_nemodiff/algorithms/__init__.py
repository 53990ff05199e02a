"""NLD generation modes as SGLang dLLM algorithms, and the `--algorithm` name registry."""

from __future__ import annotations

# --algorithm value -> SGLang dLLM algorithm class name (None: plain AR decoding, no dLLM path).
ALGORITHMS = {
    "ar": None,
    "fastdiffuser": "NemodiffFastDiffuser",
    "linearspec": "NemodiffLinearSpec",
}


def dllm_algorithm_name(algorithm: str) -> str | None:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"Unknown --algorithm {algorithm!r}; choose one of "
                         f"{', '.join(ALGORITHMS)}") from None


def algorithm_classes() -> dict:
    """Class name -> class, for SGLang's `algo_name_to_cls` (imports SGLang)."""
    from sglang_nemodiff.algorithms.fastdiffuser import NemodiffFastDiffuser
    from sglang_nemodiff.algorithms.linearspec import NemodiffLinearSpec

    return {cls.__name__: cls for cls in (NemodiffFastDiffuser, NemodiffLinearSpec)}
