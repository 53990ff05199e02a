"""`python -m sglang_nemodiff.router_server [server and --router-* flags]`: sglang-router's
`launch_server` (`--dp N` workers behind the router, one command) with the plugin's flags.

sglang-router's own `python -m sglang_router.launch_server` parses the server flags, and spawns
each worker's server, without loading SGLang's plugins: it rejects `--algorithm`, and a worker
could not read an NLD checkpoint's config. This entry point loads the plugins (this one among
them) in the launcher, as `python -m sglang.launch_server` does, and in each spawned worker
before its server starts; otherwise it is sglang-router's `main`, same flags, same processes."""

from __future__ import annotations


def _load_plugins() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # runs sglang_nemodiff.register and applies its hooks (the CLI flags among them)


def run_server_with_plugins(server_args, dp_rank):
    """sglang-router's worker target, in the spawned process, after the plugins."""
    _load_plugins()
    from sglang_router.launch_server import run_server

    run_server(server_args, dp_rank)


def main() -> None:
    _load_plugins()
    import sglang_router.launch_server as router_launcher

    # launch_server_process looks the target up in its module when it starts each worker.
    router_launcher.run_server = run_server_with_plugins
    router_launcher.main()


if __name__ == "__main__":
    main()
