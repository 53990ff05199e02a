"""`nemodiff-serve`: stock `python -m sglang.launch_server`, with the bundled model as the default
`--model-path` and CPU-friendly defaults when no CUDA GPU is visible. Every other flag passes
through unchanged (`--algorithm {ar,fastdiffuser,linearspec}` included)."""

from __future__ import annotations

import os
import sys

CPU_DEFAULTS = {"--device": "cpu", "--attention-backend": "torch_native", "--dtype": "float32",
                "--max-total-tokens": "8192"}


def with_defaults(argv: list[str]) -> list[str]:
    """`argv` plus the CPU defaults it does not set (nothing is added on a CUDA machine)."""
    args = list(argv)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        for flag, value in CPU_DEFAULTS.items():
            if flag not in args:
                args += [flag, value]
    return args


def server_command(argv: list[str]) -> list[str]:
    from sglang_nemodiff.bundled import bundled_model_path

    args = list(argv)
    if "--model-path" not in args:
        args = ["--model-path", bundled_model_path(), *args]
    return [sys.executable, "-m", "sglang.launch_server", *with_defaults(args)]


def main(argv: list[str] | None = None) -> None:
    command = server_command(sys.argv[1:] if argv is None else argv)
    print("+", " ".join(command), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
