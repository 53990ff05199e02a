"""NLD generation modes as SGLang dLLM algorithms: the one registry of `--algorithm` names."""

from __future__ import annotations

# --algorithm value -> SGLang dLLM algorithm class name (None: plain AR decoding, no dLLM path).
ALGORITHMS = {
    "ar": None,
    "fastdiffuser": "NemodiffFastDiffuser",
    "linearspec": "NemodiffLinearSpec",
    "quadratic": "NemodiffQuadratic",
}
MODES = {class_name: mode for mode, class_name in ALGORITHMS.items() if class_name}


def dllm_algorithm_name(algorithm: str) -> str | None:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"Unknown --algorithm {algorithm!r}; choose one of "
                         f"{', '.join(ALGORITHMS)}") from None


def mode_of(dllm_algorithm: str) -> str:
    """SGLang dLLM algorithm class name -> --algorithm value."""
    return MODES[dllm_algorithm]


def emits_first_token(req) -> bool:
    """A prefill pass emits the request's first token once the whole prompt is encoded (not a
    middle chunk), and not when it re-encodes a retracted request that already has it."""
    return req.extend_end >= req.dllm_block_offset and not req.output_ids


def algorithm_classes() -> dict:
    """Class name -> class, for SGLang's `algo_name_to_cls` (imports SGLang)."""
    from sglang_nemodiff.algorithms.fastdiffuser import NemodiffFastDiffuser
    from sglang_nemodiff.algorithms.linearspec import NemodiffLinearSpec
    from sglang_nemodiff.algorithms.quadratic import NemodiffQuadratic

    classes = (NemodiffFastDiffuser, NemodiffLinearSpec, NemodiffQuadratic)
    assert {cls.__name__: cls.mode_name for cls in classes} == MODES
    return {cls.__name__: cls for cls in classes}
