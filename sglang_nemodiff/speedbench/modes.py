"""Mode entries (`ar`, `linearspec@block_size=32`, ...) and the server the harness starts for each.

An entry is `MODE[@key=value[@key=value...]]`. The pairs go, as written (values read as YAML
scalars, not checked here: the server checks them), into `<out-dir>/algorithm_<entry>.yaml`, passed
to that entry's server as `--algorithm-config FILE`; the settings are those of
`sglang_nemodiff/configs/default.yaml`. Results are labelled with the entry as written."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

from sglang_nemodiff.servers import ManagedServer, has_flag


@dataclasses.dataclass(frozen=True)
class ModeEntry:
    label: str                # the entry as written, e.g. "linearspec@block_size=auto"
    algorithm: str            # the --algorithm value
    settings: dict[str, Any]  # the --algorithm-config contents ({} : the server's defaults)

    @property
    def file_stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)


def parse_entry(text: str) -> ModeEntry:
    import yaml

    algorithm, *pairs = [part.strip() for part in text.strip().split("@")]
    if not algorithm:
        raise ValueError(f"mode entry {text!r}: no mode before '@'")
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"mode entry {text!r}: {pair!r} is not key=value")
        if key in settings:
            raise ValueError(f"mode entry {text!r}: {key!r} given twice")
        settings[key] = yaml.safe_load(value.strip()) if value.strip() else None
    return ModeEntry(text.strip(), algorithm, settings)


def parse_entries(text: str, baseline: str | None = None, server_args: Sequence[str] = ()) -> list[ModeEntry]:
    """Comma-separated entries; the baseline entry first (added when missing), then as given."""
    entries = [parse_entry(x) for x in text.split(",") if x.strip()]
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"mode entries given twice: {dup}")
    if has_flag(server_args, "--algorithm-config") and any(e.settings for e in entries):
        raise ValueError("mode entries with @key=value settings and --algorithm-config in --server-args: "
                         "give the settings one way")
    if baseline is not None:
        if baseline not in labels:
            entries.insert(0, parse_entry(baseline))
        entries.sort(key=lambda e: e.label != baseline)
    return entries


def write_algorithm_config(entry: ModeEntry, out_dir: str) -> str | None:
    """`<out_dir>/algorithm_<entry>.yaml` with the entry's settings; None when it has none."""
    if not entry.settings:
        return None
    import yaml

    path = os.path.join(os.path.abspath(out_dir), f"algorithm_{entry.file_stem}.yaml")
    with open(path, "w") as f:
        f.write(f"# speedbench mode entry {entry.label}\n")
        yaml.safe_dump(entry.settings, f, sort_keys=False)
    return path


def entry_server(entry: ModeEntry, model_path: str, server_args: Sequence[str], out_dir: str, *,
                 host: str = "127.0.0.1", launcher: Sequence[str] | None = None) -> ManagedServer:
    """The (not yet started) server for `entry`: its settings file, its log in `out_dir`."""
    config = write_algorithm_config(entry, out_dir)
    args = [*server_args, "--algorithm-config", config] if config else list(server_args)
    return ManagedServer(model_path, entry.algorithm, args, host=host, launcher=launcher,
                         log_path=os.path.join(out_dir, f"server_{entry.file_stem}.log"))
