"""Map the plugin's options (`algorithm`, `ar_mode`, `algorithm_config`) onto SGLang ServerArgs."""

from __future__ import annotations

import json
import logging

from sglang_nemodiff.algorithms import dllm_algorithm_name
from sglang_nemodiff.settings import DEFAULT_CONFIG, load_settings

logger = logging.getLogger("sglang_nemodiff")

OPTION_NAMES = ("algorithm", "ar_mode", "algorithm_config")
# dLLM mode runs one request at a time unless told otherwise; NLD modes batch by default.
DEFAULT_MAX_RUNNING_REQUESTS = 16


def map_nemodiff_options(options: dict, current: dict) -> dict:
    """ServerArgs field values implied by the plugin options (`current`: the other arguments)."""
    algorithm = options.get("algorithm")
    ar_mode = bool(options.get("ar_mode"))
    config_path = options.get("algorithm_config")
    if algorithm is None and not ar_mode and config_path is None:
        return {}
    algorithm = algorithm or "ar"
    dllm_name = dllm_algorithm_name(algorithm)
    if ar_mode and dllm_name is not None:
        raise ValueError(f"--ar-mode contradicts --algorithm {algorithm}; use --algorithm ar")
    if current.get("dllm_algorithm") and current.get("dllm_algorithm") != dllm_name:
        raise ValueError(f"--algorithm {algorithm} contradicts "
                         f"--dllm-algorithm {current.get('dllm_algorithm')}")
    load_settings(config_path)  # fail at launch on a bad config, not in a scheduler process
    overrides = json.loads(current.get("json_model_override_args") or "{}")
    overrides["ar_mode"] = dllm_name is None
    fields = {"json_model_override_args": json.dumps(overrides)}
    if dllm_name is not None:
        # (first-done-first-out is off in the DllmConfig the plugin builds: patches/dllm_config.py)
        fields.update(dllm_algorithm=dllm_name, dllm_algorithm_config=config_path or DEFAULT_CONFIG)
        if current.get("max_running_requests") is None:
            fields["max_running_requests"] = DEFAULT_MAX_RUNNING_REQUESTS
        # On every device: SGLang captures DLLM_EXTEND forwards in CUDA graphs, but an NLD round
        # runs one model in several pass kinds (bidirectional draft with the draft LoRA,
        # bidirectional denoise, causal verify/refresh) chosen in Python per forward. A graph
        # freezes the branch taken at capture, so a replay could run the verify pass as a
        # bidirectional one. Until one graph set per pass kind exists, the diffusion modes run
        # eagerly (AR mode keeps SGLang's graphs). On CPU, graphs on would also make SGLang
        # switch dLLM attention to flashinfer.
        fields["disable_cuda_graph"] = True
        logger.info("sglang_nemodiff: CUDA graphs are disabled for --algorithm %s (each round runs "
                    "several attention/LoRA pass kinds; a captured graph would replay only one)",
                    algorithm)
    return fields
