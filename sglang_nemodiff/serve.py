"""`nemodiff-serve` (also `python -m sglang_nemodiff.serve`): stock `python -m sglang.launch_server`,
with the bundled model as the default `--model-path` (a bundled model's name, `nld-tiny` or `smol`,
is also taken as the path: sglang_nemodiff.bundled) and the CPU defaults of
`sglang_nemodiff.servers` when no CUDA GPU is visible. Every other flag passes through unchanged
(`--algorithm {ar,fastdiffuser,linearspec,quadratic}` included)."""

from __future__ import annotations

import os
import sys

from sglang_nemodiff.servers import has_flag, server_command


def command(argv: list[str]) -> list[str]:
    """The launch_server command `nemodiff-serve argv` runs."""
    from sglang_nemodiff.bundled import MODEL_NAMES, bundled_model_path, model_path

    args = list(argv)
    if not has_flag(args, "--model-path"):
        args = ["--model-path", bundled_model_path(), *args]
    for i, arg in enumerate(args):
        if arg == "--model-path" and i + 1 < len(args) and args[i + 1] in MODEL_NAMES \
                and not os.path.exists(args[i + 1]):
            args[i + 1] = model_path(args[i + 1])
        elif arg.startswith("--model-path=") and arg.split("=", 1)[1] in MODEL_NAMES \
                and not os.path.exists(arg.split("=", 1)[1]):
            args[i] = "--model-path=" + model_path(arg.split("=", 1)[1])
    return server_command(args)


def main(argv: list[str] | None = None) -> None:
    cmd = command(sys.argv[1:] if argv is None else argv)
    print("+", " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
