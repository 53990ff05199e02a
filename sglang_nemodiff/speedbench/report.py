"""Results: per (mode, concurrency, category) summaries with the ratio to the baseline mode, the
machine and date, and the JSON / JSONL / markdown / PNG reports."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Sequence

from sglang_nemodiff.speedbench.client import RequestRecord
from sglang_nemodiff.speedbench.data import OVERALL


def machine_info() -> dict:
    """The machine the harness runs on: CPU model, cores, GPUs when CUDA is visible; and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "gpus": [], "date": time.strftime("%Y-%m-%d")}
    from sglang_nemodiff.servers import cuda_visible

    if cuda_visible():
        import torch

        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def describe_machine(machine: dict) -> str:
    gpus = machine.get("gpus") or []
    gpu = f", {len(gpus)}x {gpus[0]}" if gpus else ", no GPU"
    return f"{machine.get('cpu')} ({machine.get('cores')} cores){gpu}; {machine.get('date')}"


def _weighted(values: list[tuple[float | None, float | None]]) -> float | None:
    """Mean of values, weighted by forwards when every value has them (plain mean otherwise)."""
    vals = [(v, w) for v, w in values if v is not None]
    if not vals:
        return None
    if all(w is not None and w > 0 for _, w in vals):
        return sum(v * w for v, w in vals) / sum(w for _, w in vals)
    return sum(v for v, _ in vals) / len(vals)


def aggregate(records: Sequence[RequestRecord], walls: dict[tuple[str, int, str], float],
              baseline: str = "ar") -> list[dict]:
    """One summary dict per (mode, concurrency, category) plus category 'overall'.

    `walls` maps (mode, concurrency, category) to the wall seconds of that batch; with all rows in
    one batch the key's category is 'overall' and the categories get no tok/s of their own.
    Modes keep the order in which they were measured.
    """
    order = {m: i for i, m in enumerate(dict.fromkeys([r.mode for r in records] + [k[0] for k in walls]))}
    groups: dict[tuple[str, int, str], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.mode, r.concurrency, r.category), []).append(r)
    for key in walls:
        if key[2] != OVERALL:
            groups.setdefault(key, [])
    ar_text = {(r.concurrency, r.question_id, r.turn): r.text for r in records
               if r.mode == baseline and r.ok and r.text is not None}

    def summarize(mode, conc, cat, recs, wall):
        ok = [r for r in recs if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        fw = [r.forwards for r in ok]
        comparable = [r for r in ok if r.text is not None and (conc, r.question_id, r.turn) in ar_text]
        return {
            "mode": mode, "concurrency": conc, "category": cat,
            "rows": len({r.question_id for r in recs}), "requests": len(recs),
            "errors": len(recs) - len(ok), "output_tokens": tokens,
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
            "wall_s": wall, "tok_per_s": tokens / wall if wall > 0 else None,
            "mean_latency_s": sum(r.latency_s for r in ok) / len(ok) if ok else None,
            "mean_request_tok_per_s": (sum(r.output_tokens / r.latency_s for r in ok if r.latency_s > 0) / len(ok)
                                       if ok else None),
            "tokens_per_forward": _weighted([(r.tokens_per_forward, r.forwards) for r in ok]),
            "forwards": sum(fw) if ok and all(f is not None for f in fw) else None,
            "accept_length": _weighted([(r.accept_length, r.forwards) for r in ok]),
            "same_text_as_baseline": (sum(r.text == ar_text[(conc, r.question_id, r.turn)] for r in comparable)
                                      / len(comparable) if comparable else None),
        }

    out = []
    for (mode, conc, cat), recs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])):
        out.append(summarize(mode, conc, cat, recs, walls.get((mode, conc, cat), 0.0)))
    for mode, conc in sorted({(m, c) for m, c, _ in groups}, key=lambda mc: (order[mc[0]], mc[1])):
        recs = [r for (m, c, _), rs in groups.items() if (m, c) == (mode, conc) for r in rs]
        wall = walls.get((mode, conc, OVERALL)) or sum(w for (m, c, _), w in walls.items() if (m, c) == (mode, conc))
        out.append(summarize(mode, conc, OVERALL, recs, wall))
    base = {(s["concurrency"], s["category"]): s["tok_per_s"] for s in out if s["mode"] == baseline}
    for s in out:
        b = base.get((s["concurrency"], s["category"]))
        s["ratio_vs_baseline"] = s["tok_per_s"] / b if b and s["tok_per_s"] is not None else None
    return out


def _ordered_modes(summary: Sequence[dict], baseline: str) -> list[str]:
    modes = list(dict.fromkeys(s["mode"] for s in summary))
    return ([baseline] if baseline in modes else []) + [m for m in modes if m != baseline]


def _fmt(v, spec=".1f", na="n/a"):
    return na if v is None else format(v, spec)


def _header(meta: dict, baseline: str, has_base: bool) -> list[str]:
    lines = []
    if meta.get("machine"):
        lines.append(f"- machine: {describe_machine(meta['machine'])}")
    for k in ("dataset", "split", "rows", "api", "max_tokens", "schedule", "single_turn_only", "preclose_thinking"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    for srv in meta.get("servers", []):
        how = f"`{srv['command']}`" if srv.get("command") else srv.get("url", "")
        settings = f" settings {srv['settings']}" if srv.get("settings") else ""
        lines.append(f"- mode {srv.get('label')}:{settings} {how}".rstrip())
    per = ("running that category alone at the given concurrency; overall = all tokens / summed wall times"
           if meta.get("schedule", "category") == "category" else
           "running all rows together at the given concurrency (per-category tok/s: n/a)")
    return lines + ["", f"Output tok/s = output tokens / wall time of {per}. TPF (tokens per forward) and "
                    "accept (mean accepted length) come from the plugin's meta_info (`/generate` only; n/a "
                    "otherwise); FastDiffuser's TPF counts every forward, the KV refresh included. "
                    f"x{baseline.upper()} = tok/s ratio to {baseline} at the same category and concurrency"
                    + ("" if has_base else f" (no {baseline} run: n/a)") + "; same = share of responses "
                    f"identical to {baseline}'s."]


def markdown_report(summary: Sequence[dict], meta: dict | None = None, baseline: str = "ar") -> str:
    meta = meta or {}
    modes = _ordered_modes(summary, baseline)
    concs = sorted({s["concurrency"] for s in summary})
    cats = sorted({s["category"] for s in summary if s["category"] != OVERALL})
    idx = {(s["mode"], s["concurrency"], s["category"]): s for s in summary}
    x_base = f"x{baseline.upper()}"
    lines = ["# SPEED-Bench results", "", *_header(meta, baseline, baseline in modes),
             "", "## tok/s by concurrency (overall)", "",
             "| concurrency | " + " | ".join(f"{m} tok/s | {m} {x_base}" for m in modes) + " |",
             "|---|" + "---|" * (2 * len(modes))]
    for c in concs:
        cells = [(idx.get((m, c, OVERALL)) or {}) for m in modes]
        lines.append(f"| {c} | " + " | ".join(f"{_fmt(s.get('tok_per_s'))} | {_fmt(s.get('ratio_vs_baseline'), '.2f')}"
                                              for s in cells) + " |")
    lines += ["", "## Overall", "",
              f"| mode | concurrency | requests | errors | output tokens | tok/s | {x_base} | "
              "mean latency s | TPF | accept | same |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in concs:
        for m in modes:
            s = idx.get((m, c, OVERALL))
            if s:
                lines.append(f"| {m} | {c} | {s['requests']} | {s['errors']} | {s['output_tokens']} | "
                             f"{_fmt(s['tok_per_s'])} | {_fmt(s['ratio_vs_baseline'], '.2f')} | "
                             f"{_fmt(s['mean_latency_s'], '.3f')} | {_fmt(s['tokens_per_forward'], '.2f')} | "
                             f"{_fmt(s['accept_length'], '.2f')} | {_fmt(s['same_text_as_baseline'], '.0%')} |")
    for c in concs:
        lines += ["", f"## Per category, concurrency {c}", "",
                  "| category | " + " | ".join(
                      f"{m} tok/s | {m} {x_base} | {m} lat s | {m} TPF | {m} accept" for m in modes) + " |",
                  "|---|" + "---|" * (5 * len(modes))]
        for cat in cats + [OVERALL]:
            cells = []
            for m in modes:
                s = idx.get((m, c, cat))
                if s is None:
                    cells += ["-"] * 5
                else:
                    cells += [_fmt(s["tok_per_s"]), _fmt(s["ratio_vs_baseline"], ".2f"),
                              _fmt(s["mean_latency_s"], ".3f"), _fmt(s["tokens_per_forward"], ".2f"),
                              _fmt(s["accept_length"], ".2f")]
            name = f"**{cat}**" if cat == OVERALL else cat
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for srv in meta.get("servers", []):
        if srv.get("error"):
            first = srv["error"].splitlines()[0] if srv["error"] else ""
            lines += ["", f"**server {srv.get('label')} did not start**: {first}"]
    errs = sum(s["errors"] for s in summary if s["category"] == OVERALL)
    if errs:
        lines += ["", f"**{errs} request(s) failed**: see `error` in speedbench_requests.jsonl."]
    return "\n".join(lines) + "\n"


def _plot_modes(ax, overall: Sequence[dict], modes: Sequence[str], key: str, ylabel: str, title: str) -> None:
    for m in modes:
        pts = sorted((s["concurrency"], s[key]) for s in overall if s["mode"] == m and s[key] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    concs = sorted({s["concurrency"] for s in overall})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_report(summary: Sequence[dict], path: str, baseline: str = "ar", title: str | None = None) -> str:
    """Tokens/s vs concurrency per mode (overall), plus the ratio to the baseline when present."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install matplotlib (or the 'bench' extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = _ordered_modes(summary, baseline)
    overall = [s for s in summary if s["category"] == OVERALL]
    has_base = baseline in modes and len(modes) > 1
    fig, axes = plt.subplots(1, 2 if has_base else 1, figsize=(11 if has_base else 6, 4.6), squeeze=False)
    _plot_modes(axes[0][0], overall, modes, "tok_per_s", "output tokens/s", "SPEED-Bench throughput (overall)")
    if has_base:
        axes[0][1].axhline(1.0, color="gray", lw=0.8, ls="--")
        _plot_modes(axes[0][1], overall, modes, "ratio_vs_baseline", f"tok/s ratio to {baseline}",
                    f"speed-up vs {baseline}")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(out_dir: str, summary: Sequence[dict], records: Sequence[RequestRecord], meta: dict,
                  baseline: str = "ar", plot: bool = True, save_text: bool = False) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "speedbench.json"),
             "requests": os.path.join(out_dir, "speedbench_requests.jsonl"),
             "markdown": os.path.join(out_dir, "speedbench.md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "summary": list(summary)}, f, indent=2)
    with open(paths["requests"], "w") as f:
        for r in records:
            d = dataclasses.asdict(r)
            if not save_text:
                d.pop("text")
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(summary, meta, baseline))
    if plot:
        title = meta.get("title") or (describe_machine(meta["machine"]) if meta.get("machine") else None)
        paths["plot"] = plot_report(summary, os.path.join(out_dir, "speedbench.png"), baseline, title=title)
    return paths
