"""Map the plugin's options (`algorithm`, `ar_mode`, `algorithm_config`) onto SGLang ServerArgs
fields. Only the names: the server a diffusion mode runs on is decided in SGLang's
`configure_server_args` hook (algorithms/server_defaults.py), so SGLang's own
`--dllm-algorithm NemodiffLinearSpec` gets the same one."""

from __future__ import annotations

import json

from sglang_nemodiff.algorithms import dllm_algorithm_name
from sglang_nemodiff.settings import load_settings

OPTION_NAMES = ("algorithm", "ar_mode", "algorithm_config")


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
    if dllm_name is None:  # AR: the checkpoint's ar_mode flag, SGLang's own decode path
        overrides = json.loads(current.get("json_model_override_args") or "{}")
        overrides["ar_mode"] = True
        return {"json_model_override_args": json.dumps(overrides)}
    fields = {"dllm_algorithm": dllm_name}
    if config_path is not None:
        fields["dllm_algorithm_config"] = config_path
    return fields
