"""SPEED-Bench harness: serve-and-measure NLD modes (AR, FastDiffuser, LinearSpec, each with optional
algorithm settings) over a concurrency sweep, AR measured in the same run.

    data.py    SPEED-Bench rows: schema, validated loading, filters, the bundled stand-in prompts
    client.py  prompts, requests (/generate, /v1/completions, /v1/chat/completions), the sweep
    modes.py   mode entries `MODE[@key=value...]` and the server started for each
               (through sglang_nemodiff.servers)
    report.py  summaries, ratios to AR, machine and date, JSON / markdown / PNG
    cli.py     options and the run

Run as `python launch/speedbench.py ...` or `python -m sglang_nemodiff.speedbench ...`; see
docs/speedbench.md."""

from sglang_nemodiff.servers import ManagedServer, ServerStartError  # noqa: F401  (kept importable here)
from sglang_nemodiff.speedbench.cli import build_parser, main  # noqa: F401
from sglang_nemodiff.speedbench.client import (ApiConfig, PromptBuilder, RequestRecord, meta_scalar,  # noqa: F401
                                               run_sweep)
from sglang_nemodiff.speedbench.data import (CATEGORIES, OVERALL, STANDIN_PATH, Row,  # noqa: F401
                                             SpeedBenchDataError, group_by_category, load_rows)
from sglang_nemodiff.speedbench.modes import ModeEntry, parse_entries  # noqa: F401
from sglang_nemodiff.speedbench.report import aggregate, markdown_report, plot_report, write_reports  # noqa: F401
