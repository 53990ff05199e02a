"""`nemodiff-serve` (also `python -m sglang_nemodiff.serve`): stock `python -m sglang.launch_server`,
with the bundled model as the default `--model-path` and the CPU defaults of
`sglang_nemodiff.servers` when no CUDA GPU is visible. Every other flag passes through unchanged
(`--algorithm {ar,fastdiffuser,linearspec}` included)."""

from __future__ import annotations

import os
import sys

from sglang_nemodiff.servers import has_flag, server_command


def command(argv: list[str]) -> list[str]:
    """The launch_server command `nemodiff-serve argv` runs."""
    args = list(argv)
    if not has_flag(args, "--model-path"):
        from sglang_nemodiff.bundled import bundled_model_path

        args = ["--model-path", bundled_model_path(), *args]
    return server_command(args)


def main(argv: list[str] | None = None) -> None:
    cmd = command(sys.argv[1:] if argv is None else argv)
    print("+", " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
