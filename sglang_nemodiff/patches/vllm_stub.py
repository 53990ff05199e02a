"""CPU shim: SGLang's CPU RotaryEmbedding path imports `vllm._custom_ops` (never calls it).

Only when vllm is not installed do we provide an empty stand-in module; with vllm present this
does nothing. GPU installs normally don't take this path."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

TARGETS = ()


def apply() -> None:
    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None, is_package=True)
    vllm.__path__ = []  # a package, so `import vllm._custom_ops` resolves
    vllm.__doc__ = "sglang_nemodiff CPU shim: vllm is not installed."
    custom_ops = types.ModuleType("vllm._custom_ops")
    custom_ops.__spec__ = importlib.machinery.ModuleSpec("vllm._custom_ops", None)
    custom_ops.__doc__ = vllm.__doc__

    def rotary_embedding(*args, **kwargs):
        raise NotImplementedError("vllm is not installed: sglang_nemodiff CPU shim")

    custom_ops.rotary_embedding = rotary_embedding
    vllm._custom_ops = custom_ops
    sys.modules["vllm"] = vllm
    sys.modules["vllm._custom_ops"] = custom_ops
