"""Malformed checkpoints fail at load, naming the missing/wrong tensor or field."""

import json
import os
import shutil

import pytest

from sglang_nemodiff.checkpoint import check_checkpoint


def _broken_copy(src, dst, *, drop_field=None, drop_tensor=None, reshape_tensor=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if drop_field:
        path = os.path.join(dst, "config.json")
        config = json.load(open(path))
        del config[drop_field]
        json.dump(config, open(path, "w"))
    if drop_tensor or reshape_tensor:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        if drop_tensor:
            del tensors[drop_tensor]
        if reshape_tensor:
            tensors[reshape_tensor] = tensors[reshape_tensor][:, :-1].contiguous()
        save_file(tensors, path)
    return str(dst)


def test_check_checkpoint_names_the_problem(tiny_checkpoint, tmp_path):
    check_checkpoint(tiny_checkpoint)
    name = "encoder.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        check_checkpoint(_broken_copy(tiny_checkpoint, tmp_path / "a", drop_tensor=name))
    with pytest.raises(ValueError, match=rf"{name} has shape \[128, 63\], expected \[128, 64\]"):
        check_checkpoint(_broken_copy(tiny_checkpoint, tmp_path / "b", reshape_tensor=name))
    with pytest.raises(ValueError, match="missing required field.*num_key_value_heads"):
        check_checkpoint(_broken_copy(tiny_checkpoint, tmp_path / "c",
                                      drop_field="num_key_value_heads"))


def test_autoconfig_names_missing_field(tiny_checkpoint, tmp_path):
    """What SGLang's loader calls (AutoConfig.from_pretrained) names the missing field."""
    import sglang_nemodiff
    from transformers import AutoConfig

    sglang_nemodiff._register_config()
    broken = _broken_copy(tiny_checkpoint, tmp_path / "cfg", drop_field="hidden_size")
    with pytest.raises(ValueError, match="missing required field.*hidden_size"):
        AutoConfig.from_pretrained(broken)
    assert AutoConfig.from_pretrained(tiny_checkpoint).mask_token_id == 100


@pytest.mark.slow
def test_sglang_server_fails_at_load_naming_tensor(tiny_checkpoint, tmp_path):
    """Real launches: a missing tensor and a wrong shape stop the server with the tensor's name."""
    from conftest import CPU_ARGS
    from sglang_nemodiff.servers import ManagedServer, ServerStartError

    name = "encoder.layers.0.self_attn.k_proj.weight"
    cases = [(_broken_copy(tiny_checkpoint, tmp_path / "missing", drop_tensor=name),
              f"missing tensor {name}"),
             (_broken_copy(tiny_checkpoint, tmp_path / "shape", reshape_tensor=name),
              f"{name} has shape [32, 63], expected [32, 64]")]
    servers = [ManagedServer(path, "ar", list(CPU_ARGS), log_path=str(tmp_path / f"{i}.log"))
               for i, (path, _) in enumerate(cases)]
    for server in servers:  # both start at once: one wait
        server.start()
    try:
        for server, (_, message) in zip(servers, cases):
            with pytest.raises(ServerStartError):
                server.wait_ready(timeout=600)
            assert message in open(server.log_path, errors="replace").read()
    finally:
        for server in servers:
            server.stop()
