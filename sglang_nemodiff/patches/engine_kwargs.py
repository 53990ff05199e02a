"""`sgl.Engine(algorithm=..., ar_mode=..., algorithm_config=...)`: the same options as the CLI.

`Engine.__init__` loads plugins and then builds `self.server_args_class(**kwargs)`, so replacing
that class attribute with a factory makes the options work on the very first Engine."""

from __future__ import annotations

TARGETS = ("sglang.srt.entrypoints.engine.Engine.server_args_class",)


def apply() -> None:
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.server_args import ServerArgs

    from sglang_nemodiff.server_args import OPTION_NAMES, map_nemodiff_options

    if getattr(Engine.server_args_class, "_nemodiff_factory", False):
        return
    server_args_class = Engine.server_args_class

    def build_server_args(**kwargs) -> ServerArgs:
        options = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        kwargs.update(map_nemodiff_options(options, kwargs))
        return server_args_class(**kwargs)

    build_server_args._nemodiff_factory = True
    Engine.server_args_class = staticmethod(build_server_args)
