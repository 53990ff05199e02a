"""SPEED-Bench rows: the official schema, validated loading from a local parquet/jsonl/json file or
a dataset directory (Hub layout, one split), filters, and the bundled stand-in prompt file."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Sequence

CATEGORIES = ("coding", "humanities", "math", "multilingual", "qa", "rag", "reasoning", "roleplay",
              "stem", "summarization", "writing")
SPLITS = ("qualitative", "throughput_1k", "throughput_2k", "throughput_8k", "throughput_16k",
          "throughput_32k")
# field -> (expected type description, may be null)
SCHEMA = {
    "question_id": ("string", False),
    "category": ("string", False),
    "sub_category": ("string", True),
    "turns": ("non-empty list of non-empty strings", False),
    "source": ("string", True),
    "src_id": ("string", True),
    "difficulty": ("string", True),
    "multiturn": ("bool", False),
}
OVERALL = "overall"  # the name of all categories together in the results
STANDIN_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                            "speedbench_standin.jsonl")


class SpeedBenchDataError(ValueError):
    """The prompt file is missing or does not follow the SPEED-Bench schema."""


@dataclasses.dataclass(frozen=True)
class Row:
    question_id: str
    category: str
    sub_category: str | None
    turns: tuple[str, ...]
    source: str | None
    src_id: str | None
    difficulty: str | None
    multiturn: bool

    @property
    def single_turn(self) -> bool:
        return not self.multiturn and len(self.turns) == 1


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _validate_row(raw: Any, where: str) -> Row:
    if not isinstance(raw, dict):
        raise SpeedBenchDataError(f"{where}: expected an object with fields {list(SCHEMA)}, got {_type_name(raw)}")
    qid = raw.get("question_id")
    where_q = f"{where} (question_id={qid!r})" if isinstance(qid, (str, int)) else where
    missing = [k for k in SCHEMA if k not in raw]
    if missing:
        raise SpeedBenchDataError(
            f"{where_q}: missing field(s) {missing}; the SPEED-Bench schema needs {list(SCHEMA)}")
    vals = {}
    for field, (expected, nullable) in SCHEMA.items():
        v = raw[field]
        if field == "turns":
            if hasattr(v, "tolist"):  # numpy array from pandas-like readers
                v = v.tolist()
            if isinstance(v, tuple):
                v = list(v)
            if not isinstance(v, list) or not v:
                raise SpeedBenchDataError(
                    f"{where_q}: field 'turns' must be a {expected}, got {_type_name(v)} {v!r:.80}")
            for j, t in enumerate(v):
                if not isinstance(t, str) or not t.strip():
                    raise SpeedBenchDataError(
                        f"{where_q}: field 'turns'[{j}] must be a non-empty string, got {_type_name(t)} {t!r:.80}")
            vals[field] = tuple(v)
        elif field == "multiturn":
            if not isinstance(v, bool):
                raise SpeedBenchDataError(f"{where_q}: field 'multiturn' must be a bool, got {_type_name(v)} {v!r:.80}")
            vals[field] = v
        else:
            if v is None and nullable:
                vals[field] = None
                continue
            if field == "question_id" and isinstance(v, int) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str) or (not nullable and not v):
                raise SpeedBenchDataError(
                    f"{where_q}: field {field!r} must be a {'non-empty ' if not nullable else ''}{expected}"
                    f"{' or null' if nullable else ''}, got {_type_name(v)} {v!r:.80}")
            vals[field] = v
    return Row(**vals)


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}: row at line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SpeedBenchDataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _read_json(path: str) -> list[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise SpeedBenchDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise SpeedBenchDataError(f"{path}: expected a JSON list of rows, got {_type_name(data)}")
    return [(f"{path}: row {i}", r) for i, r in enumerate(data)]


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SpeedBenchDataError(
            f"{path}: reading parquet needs pyarrow; install it (pip install pyarrow, or the project's "
            "'bench' extra: pip install 'sglang-nemodiff[bench]'), or convert the file to jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SpeedBenchDataError(f"{path}: cannot read as parquet: {e}") from None
    missing = [k for k in SCHEMA if k not in table.column_names]
    if missing:
        raise SpeedBenchDataError(
            f"{path}: parquet columns {table.column_names} lack {missing}; the SPEED-Bench schema needs {list(SCHEMA)}")
    return [(f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist())]


DATA_EXTS = (".parquet", ".jsonl", ".json")


def resolve_dataset_path(path: str, split: str | None = None) -> list[str]:
    """Data files for `path`: the file itself, or the `split` files inside a dataset directory.

    A directory is searched (recursively) for parquet/jsonl/json files whose relative path has the
    split name as a directory or file-name prefix, as in the Hub layout ``qualitative/test-*.parquet``.
    """
    if not os.path.exists(path):
        raise SpeedBenchDataError(
            f"{path}: no such file or directory. Download SPEED-Bench yourself (see docs/speedbench.md) "
            f"or use the bundled stand-in: {STANDIN_PATH}")
    if os.path.isfile(path):
        return [path]
    split = split or "qualitative"
    found: dict[str, list[str]] = {ext: [] for ext in DATA_EXTS}
    for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        ext = next((e for e in DATA_EXTS if f.endswith(e)), None)
        if ext is None or not os.path.isfile(f):
            continue
        parts = os.path.relpath(f, path).split(os.sep)
        if any(q == split or q.startswith(split + "-") for q in parts[:-1] + [parts[-1][:-len(ext)]]):
            found[ext].append(f)
    for ext in DATA_EXTS:  # one format per split: parquet first
        if found[ext]:
            return found[ext]
    raise SpeedBenchDataError(
        f"{path}: directory has no {'/'.join(DATA_EXTS)} files for split {split!r} "
        f"(looked for {split}/*, {split}-*, {split}.jsonl); known splits: {', '.join(SPLITS)}")


def load_rows(path: str, split: str | None = None, *, single_turn_only: bool = False,
              categories: Iterable[str] | None = None, max_per_category: int | None = None) -> list[Row]:
    """Validated SPEED-Bench rows from a local parquet/jsonl/json file or dataset directory."""
    rows: list[Row] = []
    for f in resolve_dataset_path(path, split):
        if f.endswith(".parquet"):
            raw = _read_parquet(f)
        elif f.endswith(".jsonl"):
            raw = _read_jsonl(f)
        else:
            raw = _read_json(f)
        rows.extend(_validate_row(r, where) for where, r in raw)
    if not rows:
        raise SpeedBenchDataError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.question_id] = seen.get(r.question_id, 0) + 1
    dups = [q for q, n in seen.items() if n > 1]
    if dups:
        raise SpeedBenchDataError(f"{path}: duplicate question_id(s) {dups[:5]}")
    if single_turn_only:
        rows = [r for r in rows if r.single_turn]
    if categories:
        wanted = list(categories)
        present = {r.category for r in rows}
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise SpeedBenchDataError(f"{path}: no rows in categories {unknown}; present: {sorted(present)}")
        rows = [r for r in rows if r.category in wanted]
    if max_per_category is not None:
        kept: dict[str, int] = {}
        out = []
        for r in rows:
            if kept.get(r.category, 0) < max_per_category:
                kept[r.category] = kept.get(r.category, 0) + 1
                out.append(r)
        rows = out
    if not rows:
        raise SpeedBenchDataError(f"{path}: no rows left after filtering")
    return rows


def group_by_category(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.category, []).append(r)
    return out


def repeat_rows(rows: Sequence[Row], times: int) -> list[Row]:
    """Each row `times` times (copies get question_id `ID#k`), to keep high concurrencies busy."""
    return [r if k == 0 else dataclasses.replace(r, question_id=f"{r.question_id}#{k}")
            for k in range(times) for r in rows]
