"""`--algorithm {ar,fastdiffuser,linearspec,quadratic}`, `--ar-mode` and `--algorithm-config` on the stock
CLI: added to `ServerArgs.add_cli_args`, mapped onto real ServerArgs fields in `from_cli_args`."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_nemodiff.algorithms import ALGORITHMS
from sglang_nemodiff.server_args import OPTION_NAMES, map_nemodiff_options

TARGETS = (
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
)


def add_cli_args(result, parser):
    group = parser.add_argument_group("sglang_nemodiff (Nemotron-Labs Diffusion models)")
    group.add_argument("--algorithm", choices=sorted(ALGORITHMS), default=None,
                       help="NLD generation mode: ar (left to right, the default), fastdiffuser "
                            "(iterative denoising of 32-token blocks), linearspec (draft a block "
                            "bidirectionally, verify causally; identical to ar at temperature 0) or "
                            "quadratic (one forward verifies a block and drafts the next; identical "
                            "to ar at temperature 0).")
    group.add_argument("--ar-mode", action="store_true", default=False,
                       help="Set the checkpoint's ar_mode flag (implied by --algorithm ar).")
    group.add_argument("--algorithm-config", default=None,
                       help="YAML file with algorithm settings (block_size, threshold, use_lora, "
                            "lora_path); defaults: sglang_nemodiff/configs/default.yaml.")


def from_cli_args(original, cls, args):
    options = {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)}
    for name in options:
        delattr(args, name)
    for field, value in map_nemodiff_options(options, vars(args)).items():
        setattr(args, field, value)
    return original(cls, args)


def apply() -> None:
    HookRegistry.register(TARGETS[0], add_cli_args, HookType.AFTER)
    HookRegistry.register(TARGETS[1], from_cli_args, HookType.AROUND)
