"""One SGLang server lifecycle for everything that starts servers (nemodiff-serve, the SPEED-Bench
harness, launch/measure_modes.py, launch/demo.py, the tests).

`ManagedServer` runs `python -m sglang.launch_server --model-path M --algorithm MODE ...` in its own
process group, waits for `/health_generate` (showing the server log's tail when it exits or times
out) and kills the whole process group on stop. When no CUDA GPU is visible, the CPU defaults
(`CPU_DEFAULTS`) are added for every flag the caller did not set.

Imports nothing from SGLang (and torch only to ask whether CUDA is visible, only when needed)."""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

CPU_DEFAULTS = (("--device", "cpu"), ("--attention-backend", "torch_native"), ("--dtype", "float32"),
                ("--max-total-tokens", "8192"))
CPU_ARGS = tuple(item for pair in CPU_DEFAULTS for item in pair)
LAUNCHER = (sys.executable, "-m", "sglang.launch_server")


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy in time."""


def has_flag(args: Sequence[str], flag: str) -> bool:
    """`flag` given in `args`, as `--flag value` or `--flag=value`."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


@functools.lru_cache(maxsize=1)
def cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def with_cpu_defaults(args: Sequence[str]) -> list[str]:
    """`args` plus the CPU defaults it does not set; unchanged when a CUDA GPU is visible."""
    args = list(args)
    missing = [pair for pair in CPU_DEFAULTS if not has_flag(args, pair[0])]
    if missing and not cuda_visible():
        args += [item for pair in missing for item in pair]
    return args


def server_command(args: Sequence[str], launcher: Sequence[str] | None = None) -> list[str]:
    """The launch command for `args` (CPU defaults added when no CUDA GPU is visible)."""
    return [*(launcher or LAUNCHER), *with_cpu_defaults(args)]


@contextlib.contextmanager
def sigterm_exits():
    """Inside the block SIGTERM (e.g. from `timeout`) raises SystemExit(143), so that `with`/`finally`
    blocks still stop the servers: they run in their own process groups and never see the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """`python -m sglang.launch_server --algorithm MODE ...` in its own process group (algorithm
    None: no `--algorithm`, for SGLang's own `--dllm-algorithm` spelling in `server_args`).

    Use as a context manager (`with ManagedServer(...) as server: server.wait_ready()`) or call
    `start`, `wait_ready` and `stop` yourself; `stop` kills the process group whatever happened."""

    def __init__(self, model_path: str, algorithm: str | None, server_args: Sequence[str] = (), *,
                 host: str = "127.0.0.1", port: int | None = None, log_path: str | None = None,
                 env: dict | None = None, launcher: Sequence[str] | None = None):
        self.model_path, self.algorithm = model_path, algorithm
        self.host, self.port = host, port or free_port()
        mode = ["--algorithm", algorithm] if algorithm is not None else []
        self.cmd = server_command(["--model-path", model_path, *mode, "--host", host,
                                   "--port", str(self.port), *server_args], launcher)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        return self

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def _failure(self, what: str) -> ServerStartError:
        tail = self.log_tail()
        hint = ("\nhint: this SGLang has no --algorithm flag: is the sglang_nemodiff plugin installed "
                "(pip install -e .) in this environment?" if "--algorithm" in tail and "unrecognized" in tail else "")
        return ServerStartError(f"server for {self.algorithm!r} {what}; command: {shlex.join(self.cmd)}\n"
                                f"log tail ({self.log_path}):\n{tail}{hint}")

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> float:
        """Wait until /health_generate answers 200; returns the seconds waited."""
        import requests

        t0 = time.monotonic()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._failure(f"exited with code {self.proc.returncode} before becoming healthy")
            try:
                healthy = requests.get(self.url + "/health_generate", timeout=max(poll, 5.0)).status_code == 200
            except requests.RequestException:
                healthy = False
            if self.port_taken():
                # Another process holds the port (free_port's choice was taken before SGLang bound
                # it): whatever answers there is not this server. Read after the health check, so
                # an answer from that other process is never taken for this server's.
                raise self._failure(f"could not bind port {self.port} (address already in use)")
            if healthy:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise self._failure(f"not healthy after {timeout:.0f} s")
            time.sleep(poll)

    def port_taken(self) -> bool:
        """Whether this server's log says its HTTP port was already in use."""
        if not self.log_path or not os.path.exists(self.log_path):
            return False
        with open(self.log_path, errors="replace") as f:
            return f"address ('{self.host}', {self.port}): address already in use" in f.read()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds and for any leftover child."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(10)
            self._signal_group(signal.SIGKILL)  # children left in the group after the launcher exited
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
