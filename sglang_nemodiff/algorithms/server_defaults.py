"""The server an NLD diffusion mode runs on, decided in SGLang's own launch-time hook
(`DllmAlgorithm.configure_server_args`), so `--dllm-algorithm NemodiffLinearSpec` (SGLang's flag)
and `--algorithm linearspec` (the plugin's) start the same server. `--algorithm` only names the
SGLang fields (server_args.py); every default below is decided here, once.

- max running requests: SGLang's dLLM path runs one request at a time unless told otherwise; the
  NLD modes batch their rounds, so 16 unless the user chose.
- CUDA graphs off, on every device: a round runs one model in several pass kinds (draft with the
  adapter, bidirectional denoise, causal verify/refresh) chosen per forward; a graph captured for
  one would replay it for all (model.py GraphPassGuard). AR mode keeps SGLang's graphs. With the
  setting `cuda_graphs: true` the model runs graph-safe passes (the kind is data, pass_kind.py)
  and SGLang's graph settings stand, on the nemodiff attention backend.
- the checkpoint's `ar_mode` flag off (a checkpoint saved with it on would run every pass causal).
- the algorithm YAML: the packaged defaults when none is given.
First-done-first-out is off in the DllmConfig the plugin builds (patches/dllm_config.py), and
SGLang itself turns the overlap schedule off for every dLLM algorithm (after this hook).
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger("sglang_nemodiff")

DEFAULT_MAX_RUNNING_REQUESTS = 16


def diffusion_server_fields(view) -> dict:
    """ServerArgs field decisions for a diffusion mode, given the resolving view of the rest."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    from sglang_nemodiff.settings import DEFAULT_CONFIG, load_settings

    fields = {}
    settings = load_settings(view.dllm_algorithm_config)  # a bad YAML fails here, at launch
    if view.dllm_algorithm_config is None:
        fields["dllm_algorithm_config"] = DEFAULT_CONFIG
    if view.max_running_requests is None:
        fields["max_running_requests"] = DEFAULT_MAX_RUNNING_REQUESTS
    overrides = json.loads(view.json_model_override_args or "{}")
    if overrides.get("ar_mode") is not False:
        overrides["ar_mode"] = False
        fields["json_model_override_args"] = json.dumps(overrides)
    graphs = view.cuda_graph_config
    if settings.cuda_graphs:
        # Graph-safe passes (model.py): the graphs stay as the user set them; the pass kind is
        # data only the nemodiff backend reads, so it is the backend (as SGLang does for an
        # algorithm's required_attention_backend).
        for field in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
            current = getattr(view, field, None)
            if current not in (None, "nemodiff"):
                logger.warning("sglang_nemodiff: cuda_graphs: true runs on the nemodiff attention "
                               "backend (%s was %s)", field, current)
            if current is not None or field == "attention_backend":
                fields[field] = "nemodiff"
    elif (graphs.decode.backend != Backend.DISABLED or graphs.prefill.backend != Backend.DISABLED
            or not view.disable_cuda_graph):
        graphs = with_phase(with_phase(graphs, Phase.DECODE, backend=Backend.DISABLED),
                            Phase.PREFILL, backend=Backend.DISABLED)
        fields.update(cuda_graph_config=graphs, disable_cuda_graph=True)
        logger.info("sglang_nemodiff: CUDA graphs are disabled for %s (each round runs several "
                    "attention/adapter pass kinds; a captured graph would replay only one)",
                    view.dllm_algorithm)
    return fields


def configure_server_args(server_args) -> None:
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    fields = diffusion_server_fields(resolving_view(server_args))
    if fields:
        declare_resolution(server_args, "sglang_nemodiff.configure_server_args", **fields)
