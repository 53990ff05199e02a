"""SPEED-Bench harness and the server lifecycle it shares (sglang_nemodiff.servers): loading,
prompts, mode entries, reporting, fake servers, and one end-to-end run on real CPU servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import sglang_nemodiff
from sglang_nemodiff import servers
from sglang_nemodiff import speedbench as sb
from sglang_nemodiff.servers import ManagedServer, ServerStartError
from sglang_nemodiff.speedbench.client import load_tokenizer
from sglang_nemodiff.speedbench.modes import entry_server
from sglang_nemodiff.speedbench.report import machine_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(**kw):
    base = dict(question_id="q0", category="math", sub_category="algebra", turns=["What is 2+2?"],
                source="test", src_id="s0", difficulty="easy", multiturn=False)
    base.update(kw)
    return base


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------- loading

def test_standin_file_schema_and_coverage():
    rows = sb.load_rows(sb.STANDIN_PATH)
    by_cat = sb.group_by_category(rows)
    assert sorted(by_cat) == sorted(sb.CATEGORIES)
    assert all(len(v) == 3 for v in by_cat.values())
    multi = [r for r in rows if r.multiturn]
    assert len(multi) >= 2 and all(len(r.turns) > 1 for r in multi)
    assert len({r.question_id for r in rows}) == len(rows)
    # the stand-in is shipped inside the package (package data)
    assert os.path.dirname(sb.STANDIN_PATH) == os.path.join(os.path.dirname(sglang_nemodiff.__file__), "data")


def test_single_turn_filter_and_category_filters():
    rows = sb.load_rows(sb.STANDIN_PATH, single_turn_only=True)
    assert rows and all(not r.multiturn and len(r.turns) == 1 for r in rows)
    assert len(rows) == len(sb.load_rows(sb.STANDIN_PATH)) - sum(r.multiturn for r in sb.load_rows(sb.STANDIN_PATH))
    rows = sb.load_rows(sb.STANDIN_PATH, categories=["math", "rag"], max_per_category=2)
    assert sorted(r.category for r in rows) == ["math", "math", "rag", "rag"]
    with pytest.raises(sb.SpeedBenchDataError, match="no rows in categories \\['nope'\\]"):
        sb.load_rows(sb.STANDIN_PATH, categories=["nope"])


def test_jsonl_roundtrip(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [row(), "", row(question_id=7, turns=["a", "b"], multiturn=True,
                                                           sub_category=None, difficulty=None)])
    rows = sb.load_rows(p)
    assert [r.question_id for r in rows] == ["q0", "7"]
    assert rows[1].turns == ("a", "b") and rows[1].sub_category is None
    assert [r.question_id for r in sb.load_rows(p, single_turn_only=True)] == ["q0"]


def test_parquet_file_and_hub_directory_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [row(question_id=f"q{i}", category=c, turns=[f"t{i}"] if i % 2 else [f"t{i}", "more"],
                multiturn=not i % 2) for i, c in enumerate(["math", "qa", "rag", "math"])]
    table = pa.Table.from_pylist(rows)
    f = tmp_path / "one.parquet"
    pq.write_table(table, f)
    loaded = sb.load_rows(str(f))
    assert [r.question_id for r in loaded] == ["q0", "q1", "q2", "q3"]
    assert loaded[0].turns == ("t0", "more") and loaded[0].multiturn
    # Hub layout: <dir>/<config>/test-00000-of-00001.parquet, split picked by --split
    for split, n in (("qualitative", 4), ("throughput_1k", 2), ("throughput_16k", 1)):
        d = tmp_path / "hub" / split
        d.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[:n]), d / "test-00000-of-00001.parquet")
    hub = str(tmp_path / "hub")
    assert len(sb.load_rows(hub)) == 4
    assert len(sb.load_rows(hub, "throughput_1k")) == 2
    assert len(sb.load_rows(hub, "throughput_16k")) == 1
    with pytest.raises(sb.SpeedBenchDataError, match="no .* files for split 'throughput_8k'"):
        sb.load_rows(hub, "throughput_8k")


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    r = row()
    del r["src_id"]
    pq.write_table(pa.Table.from_pylist([r]), tmp_path / "bad.parquet")
    with pytest.raises(sb.SpeedBenchDataError, match="lack \\['src_id'\\]"):
        sb.load_rows(str(tmp_path / "bad.parquet"))


def test_parquet_without_pyarrow_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(sb.SpeedBenchDataError, match="needs pyarrow.*pip install pyarrow"):
        sb.load_rows(str(tmp_path / "x.parquet"))


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(sb.SpeedBenchDataError, match="cannot read as parquet"):
        sb.load_rows(str(tmp_path / "x.parquet"))


def test_missing_file_names_path_and_standin(tmp_path):
    with pytest.raises(sb.SpeedBenchDataError, match="no such file.*speedbench_standin.jsonl"):
        sb.load_rows(str(tmp_path / "absent.parquet"))


@pytest.mark.parametrize("bad, pattern", [
    (row(turns="just a string"), r"line 2 \(question_id='q0'\): field 'turns' must be a non-empty list"),
    (row(turns=[]), r"line 2 .*field 'turns' must be a non-empty list"),
    (row(turns=["ok", 3]), r"line 2 .*field 'turns'\[1\] must be a non-empty string, got int"),
    (row(turns=["ok", "  "]), r"field 'turns'\[1\] must be a non-empty string"),
    (row(multiturn="no"), r"line 2 .*field 'multiturn' must be a bool, got str"),
    (row(category=None), r"line 2 .*field 'category' must be a non-empty string, got null"),
    (row(difficulty=3), r"field 'difficulty' must be a string or null, got int"),
    ({k: v for k, v in row().items() if k != "turns"}, r"line 2 .*missing field\(s\) \['turns'\]"),
    ([1, 2], r"line 2: expected an object"),
])
def test_malformed_rows_name_row_and_field(tmp_path, bad, pattern):
    p = write_jsonl(tmp_path / "bad.jsonl", [row(question_id="first"), bad])
    with pytest.raises(sb.SpeedBenchDataError, match=pattern):
        sb.load_rows(p)


def test_malformed_json_line_and_duplicates(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [row(), "{not json"])
    with pytest.raises(sb.SpeedBenchDataError, match="line 2 is not valid JSON"):
        sb.load_rows(p)
    p = write_jsonl(tmp_path / "dup.jsonl", [row(), row()])
    with pytest.raises(sb.SpeedBenchDataError, match="duplicate question_id"):
        sb.load_rows(p)
    p = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(sb.SpeedBenchDataError, match="no rows"):
        sb.load_rows(p)


def test_cli_reports_data_errors_cleanly(tmp_path, capsys):
    p = write_jsonl(tmp_path / "bad.jsonl", [row(multiturn=1)])
    assert sb.main(["--data", p, "--url", "http://127.0.0.1:9"]) == 2
    assert "field 'multiturn' must be a bool" in capsys.readouterr().err


# ------------------------------------------------------------------------------- prompts

class FakeTokenizer:
    def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"


def test_preclose_thinking_after_chat_template():
    hist = [{"role": "user", "content": "hi"}]
    assert sb.PromptBuilder(FakeTokenizer()).text(hist) == "<user>hi<assistant>"
    assert sb.PromptBuilder(FakeTokenizer(), preclose=True).text(hist) == "<user>hi<assistant><think></think>"
    assert sb.PromptBuilder(None, preclose=True, system_prompt="S").text(hist) == "S\n\nhi<think></think>"
    chat = sb.PromptBuilder(None, preclose=True).chat_payload(hist)
    assert chat["messages"][-1] == {"role": "assistant", "content": "<think></think>"}
    assert chat["continue_final_message"] is True
    assert sb.PromptBuilder(None).chat_payload(hist) == {"messages": hist}


def test_preclose_with_project_tokenizer_chat_template():
    from sglang_nemodiff.tokenizer import build_tokenizer

    tok = build_tokenizer()
    text = sb.PromptBuilder(tok, preclose=True).text([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n<think></think>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-2:] == [12, 13]  # <think>, </think> stay single special tokens


def test_meta_scalar_accepts_scalars_and_one_element_lists():
    m = {"a": 2.5, "b": [3], "c": [], "d": None, "e": "x", "f": [1, 3]}
    assert sb.meta_scalar(m, "a") == 2.5 and sb.meta_scalar(m, "b") == 3.0
    assert sb.meta_scalar(m, "c") is None and sb.meta_scalar(m, "d") is None and sb.meta_scalar(m, "e") is None
    assert sb.meta_scalar(m, "missing") is None and sb.meta_scalar(None, "a") is None
    assert sb.meta_scalar(m, "f") == 2.0


# ------------------------------------------------------------------------------- mode entries, servers

def test_mode_entries_with_settings(tmp_path):
    from sglang_nemodiff.settings import load_settings

    entries = sb.parse_entries("linearspec@block_size=16@use_lora=false, fastdiffuser@threshold=0.8,"
                               "linearspec@block_size=auto", baseline="ar")
    assert [e.label for e in entries] == ["ar", "linearspec@block_size=16@use_lora=false",
                                          "fastdiffuser@threshold=0.8", "linearspec@block_size=auto"]
    assert [e.algorithm for e in entries] == ["ar", "linearspec", "fastdiffuser", "linearspec"]
    assert entries[0].settings == {} and entries[3].settings == {"block_size": "auto"}
    assert entries[1].settings == {"block_size": 16, "use_lora": False}
    assert sb.parse_entries("linearspec,ar", baseline="ar")[0].label == "ar"  # baseline first
    # the file the harness writes is the plugin's own --algorithm-config format
    srv = entry_server(entries[1], "m", ["--x", "1"], str(tmp_path))
    config = srv.cmd[srv.cmd.index("--algorithm-config") + 1]
    assert os.path.dirname(config) == str(tmp_path) and srv.log_path == str(tmp_path / "server_linearspec_block_size=16_use_lora=false.log")
    settings = load_settings(config)
    assert (settings.block_size, settings.use_lora, settings.threshold) == (16, False, 0.9)
    assert "--algorithm-config" not in entry_server(entries[0], "m", [], str(tmp_path)).cmd
    for bad, pattern in (("ar,ar", "given twice"), ("linearspec@block_size", "not key=value"),
                         ("linearspec@a=1@a=2", "'a' given twice"), ("@a=1", "no mode")):
        with pytest.raises(ValueError, match=pattern):
            sb.parse_entries(bad)
    with pytest.raises(ValueError, match="one way"):
        sb.parse_entries("linearspec@block_size=16", server_args=["--algorithm-config=x.yaml"])


def test_cpu_defaults_only_for_flags_not_given(monkeypatch):
    monkeypatch.setattr(servers, "cuda_visible", lambda: False)
    assert servers.with_cpu_defaults([]) == list(servers.CPU_ARGS)
    args = servers.with_cpu_defaults(["--dtype=bfloat16", "--max-total-tokens", "100"])
    assert args == ["--dtype=bfloat16", "--max-total-tokens", "100", "--device", "cpu",
                    "--attention-backend", "torch_native"]
    srv = ManagedServer("m", "linearspec", ["--foo"], port=1234, launcher=["L"])
    assert srv.cmd == ["L", "--model-path", "m", "--algorithm", "linearspec", "--host", "127.0.0.1",
                       "--port", "1234", "--foo", *servers.CPU_ARGS] and srv.url == "http://127.0.0.1:1234"
    from sglang_nemodiff.bundled import bundled_model_path
    from sglang_nemodiff.serve import command

    assert command(["--algorithm", "ar"])[:7] == [sys.executable, "-m", "sglang.launch_server", "--model-path",
                                                  bundled_model_path(), "--algorithm", "ar"]
    assert command(["--model-path=x"])[3:] == ["--model-path=x", *servers.CPU_ARGS]
    monkeypatch.setattr(servers, "cuda_visible", lambda: True)
    assert servers.with_cpu_defaults(["--foo"]) == ["--foo"]


def test_sigterm_exits_inside_the_block_only():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with servers.sigterm_exits():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises first
    assert exc.value.code == 143 and signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------- reporting

def synthetic():
    recs, walls = [], {}
    for mode, speed, tpf in (("ar", 10.0, None), ("linearspec", 30.0, 3.0)):
        for c in (1, 2):
            for cat in ("math", "qa"):
                for i in range(2):
                    toks = 20
                    recs.append(sb.RequestRecord(mode, c, f"{cat}{i}", cat, 0, True, toks / speed, toks, 5,
                                                 tpf, toks / tpf if tpf else None, tpf and tpf - 1,
                                                 text=f"{cat}{i}" if mode == "ar" or i == 0 else "diff"))
                walls[(mode, c, cat)] = 2 * 20 / (speed * c)
    recs.append(sb.RequestRecord("linearspec", 2, "qa9", "qa", 0, False, 1.0, error="boom"))
    return recs, walls


def test_aggregate_ratios_and_plugin_metrics():
    recs, walls = synthetic()
    summ = sb.aggregate(recs, walls)
    idx = {(s["mode"], s["concurrency"], s["category"]): s for s in summ}
    ar, ls = idx[("ar", 2, "math")], idx[("linearspec", 2, "math")]
    assert ar["tok_per_s"] == pytest.approx(20.0) and ls["tok_per_s"] == pytest.approx(60.0)
    assert ls["ratio_vs_baseline"] == pytest.approx(3.0) and ar["ratio_vs_baseline"] == pytest.approx(1.0)
    assert ar["tokens_per_forward"] is None and ar["accept_length"] is None
    assert ls["tokens_per_forward"] == pytest.approx(3.0) and ls["accept_length"] == pytest.approx(2.0)
    assert ls["same_text_as_baseline"] == pytest.approx(0.5)
    ov = idx[("linearspec", 2, "overall")]
    assert ov["requests"] == 5 and ov["errors"] == 1 and ov["output_tokens"] == 80
    assert ov["tok_per_s"] == pytest.approx(60.0) and ov["ratio_vs_baseline"] == pytest.approx(3.0)
    assert ov["mean_latency_s"] == pytest.approx(20 / 30)
    # no baseline in the run: ratios are n/a
    assert all(s["ratio_vs_baseline"] is None for s in sb.aggregate([r for r in recs if r.mode != "ar"], walls))


def test_aggregate_all_rows_in_one_batch():
    """--schedule mixed: one wall per (mode, concurrency); categories get no tok/s of their own."""
    recs, walls = synthetic()
    summ = sb.aggregate(recs, {(m, c, sb.OVERALL): 1.0 for m, c, _ in walls})
    idx = {(s["mode"], s["concurrency"], s["category"]): s for s in summ}
    assert len(idx) == len(summ) == 2 * 2 * 3
    assert [s["mode"] for s in summ][0] == "ar"  # measured order, not alphabetical
    ov = idx[("linearspec", 2, sb.OVERALL)]
    assert ov["tok_per_s"] == pytest.approx(80.0) and ov["ratio_vs_baseline"] == pytest.approx(1.0)
    assert idx[("linearspec", 2, "math")]["tok_per_s"] is None and idx[("linearspec", 2, "math")]["requests"] == 2


def test_reports_written(tmp_path):
    pytest.importorskip("matplotlib")
    recs, walls = synthetic()
    summ = sb.aggregate(recs, walls)
    machine = {"cpu": "Test CPU 9000", "cores": 2, "gpus": [], "date": "2025-01-02"}
    paths = sb.write_reports(str(tmp_path), summ, recs, {"dataset": "synthetic", "api": "generate",
                                                         "machine": machine})
    data = json.load(open(paths["json"]))
    assert {s["mode"] for s in data["summary"]} == {"ar", "linearspec"}
    assert data["meta"]["dataset"] == "synthetic"
    lines = open(paths["requests"]).read().splitlines()
    assert len(lines) == len(recs) and "text" not in json.loads(lines[0])
    md = open(paths["markdown"]).read()
    assert "| linearspec | 2 | 5 | 1 | 80 | 60.0 | 3.00 |" in md
    assert "- machine: Test CPU 9000 (2 cores), no GPU; 2025-01-02" in md
    assert "| concurrency | ar tok/s | ar xAR | linearspec tok/s | linearspec xAR |" in md
    assert "| 2 | 20.0 | 1.00 | 60.0 | 3.00 |" in md
    assert "## Per category, concurrency 1" in md and "| math |" in md and "n/a" in md
    assert "1 request(s) failed" in md
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_machine_info_names_cpu_cores_and_date():
    info = machine_info()
    assert info["cpu"] and info["cores"] == os.cpu_count() and isinstance(info["gpus"], list)
    assert info["date"] == time.strftime("%Y-%m-%d")


# ------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_cpu_servers_ar_and_linearspec(tmp_path, server_pool, tiny_checkpoint):
    """The harness CLI against real CPU SGLang servers: the session's AR and LinearSpec servers on the
    tiny random checkpoint (shared with the serving tests, so usually no extra start-up), two roleplay
    rows (one multi-turn, whose second turn sees the first answer), concurrency 1 and 2, 16 tokens.
    At temperature 0 LinearSpec is lossless: every response must be AR's, text for text."""
    pytest.importorskip("matplotlib")
    urls = {mode: server_pool.get(tiny_checkpoint, mode).url for mode in ("ar", "linearspec")}
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "speedbench.py"),
         "--url", urls["ar"], "--url-label", "ar", "--url", urls["linearspec"], "--url-label", "linearspec",
         "--categories", "roleplay", "--max-per-category", "2", "--concurrency", "1,2", "--max-tokens", "16",
         "--warmup", "1", "--out-dir", str(out), "--no-progress", "--save-text"],
        capture_output=True, text=True, timeout=600)
    elapsed = time.time() - t0
    assert proc.returncode == 0, f"rc={proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    data = json.load(open(out / "speedbench.json"))
    summ = data["summary"]
    rows = sb.load_rows(sb.STANDIN_PATH, categories=["roleplay"], max_per_category=2)
    assert len(rows) == 2 and sum(r.multiturn for r in rows) == 1
    assert {(s["mode"], s["concurrency"], s["category"]) for s in summ} == {
        (m, c, cat) for m in ("ar", "linearspec") for c in (1, 2) for cat in ("roleplay", "overall")}
    for s in summ:
        assert s["rows"] == 2 and s["requests"] == 3 and s["errors"] == 0, s
        assert 0 < s["output_tokens"] <= 3 * 16 and s["tok_per_s"] > 0 and s["ratio_vs_baseline"] > 0
    ls = [s for s in summ if s["mode"] == "linearspec"]
    assert all(s["same_text_as_baseline"] == 1.0 for s in ls), [s["same_text_as_baseline"] for s in ls]
    # the plugin reports its counters through /generate meta_info; AR has none
    assert all(s["tokens_per_forward"] > 0 and s["accept_length"] is not None and s["forwards"] > 0 for s in ls)
    assert all(s["tokens_per_forward"] is None for s in summ if s["mode"] == "ar")
    recs = [json.loads(x) for x in open(out / "speedbench_requests.jsonl")]
    assert len(recs) == 2 * 2 * 3 and all(0 < r["output_tokens"] <= 16 and r["text"] for r in recs)
    turn1 = [r for r in recs if r["turn"] == 1]
    assert len(turn1) == 4 and {r["question_id"] for r in turn1} == {next(r.question_id for r in rows if r.multiturn)}
    md = (out / "speedbench.md").read_text()
    assert "| ar | 1 | 3 | 0 |" in md and "| linearspec | 2 | 3 | 0 |" in md and "- machine: " in md
    assert (out / "speedbench.png").read_bytes()[:4] == b"\x89PNG"
    assert [s["label"] for s in data["meta"]["servers"]] == ["ar", "linearspec"]
    assert data["meta"]["machine"]["cores"] == os.cpu_count()
    print(f"e2e speedbench: {elapsed:.0f} s\n{md}")


# ------------------------------------------------------------------------------- fake server

FAKE_SERVER = r'''
import argparse, asyncio, json, sys
from aiohttp import web

p = argparse.ArgumentParser()
p.add_argument("--model-path"); p.add_argument("--algorithm", default="ar")
p.add_argument("--host", default="127.0.0.1"); p.add_argument("--port", type=int)
a, rest = p.parse_known_args()
LOG = []
print("ARGV " + json.dumps(sys.argv[1:]), flush=True)

def n_tokens(max_new):
    return min(max_new, 8)

def meta(n):
    if a.algorithm == "ar":
        return {}
    return {"nemodiff_tokens_per_forward": [2.0], "nemodiff_forwards": n / 2.0, "nemodiff_accept_length": [1.0]}

async def generate(req):
    body = await req.json()
    LOG.append(body)
    sp = body["sampling_params"]
    assert sp["temperature"] == 0, sp
    n = n_tokens(sp["max_new_tokens"])
    await asyncio.sleep(0.01)
    if "FAIL" in body["text"]:
        return web.Response(status=500, text="boom")
    text = "A" * n if a.algorithm == "ar" else ("A" * n if len(body["text"]) % 2 else "B" * n)
    return web.json_response({"text": text, "meta_info": {"prompt_tokens": len(body["text"]),
                              "completion_tokens": n, "finish_reason": {"type": "length"}, **meta(n)}})

async def completions(req):
    body = await req.json()
    n = n_tokens(body["max_tokens"])
    return web.json_response({"choices": [{"text": "x" * n, "finish_reason": "length"}],
                              "usage": {"prompt_tokens": 3, "completion_tokens": n}})

async def chat(req):
    body = await req.json()
    assert body["messages"][-1]["role"] == ("assistant" if body.get("continue_final_message") else "user")
    n = n_tokens(body["max_tokens"])
    return web.json_response({"choices": [{"message": {"role": "assistant", "content": "y" * n},
                              "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": n}})

async def ok(req):
    return web.json_response({})

async def model_info(req):
    return web.json_response({"model_path": a.model_path, "tokenizer_path": a.model_path})

async def models(req):
    return web.json_response({"data": [{"id": "fake-model"}]})

async def requests_log(req):
    return web.json_response(LOG)

app = web.Application()
app.add_routes([web.post("/generate", generate), web.post("/v1/completions", completions),
                web.post("/v1/chat/completions", chat), web.get("/health_generate", ok),
                web.get("/model_info", model_info),
                web.get("/v1/models", models), web.get("/log", requests_log)])
web.run_app(app, host=a.host, port=a.port, print=None)
'''


@pytest.fixture
def fake_server_script(tmp_path):
    p = tmp_path / "fake_server.py"
    p.write_text(FAKE_SERVER)
    return str(p)


@pytest.fixture
def tokenizer_dir(tmp_path):
    from sglang_nemodiff.tokenizer import build_tokenizer

    d = tmp_path / "tok"
    build_tokenizer().save_pretrained(str(d))
    return str(d)


def _start_fake(script, model_path, algorithm, tmp_path):
    srv = ManagedServer(model_path, algorithm, launcher=[sys.executable, script],
                        log_path=str(tmp_path / f"fake_{algorithm}.log"))
    srv.start()
    srv.wait_ready(60, poll=0.2)
    return srv


def _fake_same_share(tokenizer_dir, rows):
    """The fake LinearSpec answers like AR exactly when the prompt's length is odd."""
    builder = sb.PromptBuilder(load_tokenizer(tokenizer_dir), preclose=True)
    flags = []
    for r in rows:
        history = []
        for turn in r.turns:
            history.append({"role": "user", "content": turn})
            flags.append(len(builder.text(history)) % 2 == 1)
            history.append({"role": "assistant", "content": "A" * 8})
    return sum(flags) / len(flags)


def test_harness_starts_servers_and_sweeps(tmp_path, fake_server_script, tokenizer_dir):
    """--model-path flow with a stand-in launcher: one server per mode entry (AR added and started
    first), entry settings passed as --algorithm-config FILE, start, health, sweep, stop, next."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    ls_label = "linearspec@block_size=16@use_lora=false"
    rc = sb.main(["--model-path", tokenizer_dir, "--algorithms", f"{ls_label},fastdiffuser", "--concurrency", "1,3",
                  "--max-tokens", "16", "--out-dir", str(out), "--no-progress", "--preclose-thinking",
                  "--launcher", f"{sys.executable} {fake_server_script}", "--server-args", "--foo 1",
                  "--server-start-timeout", "60"])
    assert rc == 0
    data = json.load(open(out / "speedbench.json"))
    started = data["meta"]["servers"]
    assert [s["label"] for s in started] == ["ar", ls_label, "fastdiffuser"]
    assert [s["settings"] for s in started] == [{}, {"block_size": 16, "use_lora": False}, {}]
    assert "--foo 1 --max-running-requests 3" in started[0]["command"]
    config = str(out / "algorithm_linearspec_block_size=16_use_lora=false.yaml")
    logs = {s["label"]: (out / f"server_{sb.ModeEntry(s['label'], '', {}).file_stem}.log").read_text() for s in started}
    argv = {label: json.loads(log.split("ARGV ", 1)[1].splitlines()[0]) for label, log in logs.items()}
    assert argv[ls_label][argv[ls_label].index("--algorithm-config") + 1] == config
    assert "--algorithm-config" not in argv["ar"] and "--algorithm-config" not in argv["fastdiffuser"]
    assert [argv[s["label"]][argv[s["label"]].index("--algorithm") + 1] for s in started] == \
        ["ar", "linearspec", "fastdiffuser"]
    if not servers.cuda_visible():
        assert all(" ".join(servers.CPU_ARGS) in " ".join(v) for v in argv.values())
    summ = {(s["mode"], s["concurrency"], s["category"]): s for s in data["summary"]}
    rows = sb.load_rows(sb.STANDIN_PATH)
    for mode in ("ar", ls_label, "fastdiffuser"):
        for c in (1, 3):
            ov = summ[(mode, c, "overall")]
            assert ov["requests"] == sum(len(r.turns) for r in rows) and ov["errors"] == 0
            assert ov["output_tokens"] == 8 * ov["requests"] and ov["ratio_vs_baseline"] > 0
    ls, ar = summ[(ls_label, 3, "math")], summ[("ar", 3, "math")]
    assert ls["tokens_per_forward"] == pytest.approx(2.0) and ls["accept_length"] == pytest.approx(1.0)
    assert ar["tokens_per_forward"] is None and ar["ratio_vs_baseline"] == pytest.approx(1.0)
    assert summ[(ls_label, 3, "overall")]["same_text_as_baseline"] == pytest.approx(_fake_same_share(tokenizer_dir, rows))
    assert summ[("ar", 1, "overall")]["same_text_as_baseline"] == 1.0
    md = (out / "speedbench.md").read_text()
    assert f"- mode {ls_label}: settings {{'block_size': 16, 'use_lora': False}} `" in md
    assert f"| concurrency | ar tok/s | ar xAR | {ls_label} tok/s | {ls_label} xAR | fastdiffuser tok/s |" in md
    assert (out / "speedbench.png").read_bytes()[:4] == b"\x89PNG"


def test_interleaved_passes(tmp_path, fake_server_script, tokenizer_dir):
    """--interleave: every server up at once, the modes one after another at each concurrency;
    --passes 2 runs the sweep twice and a mode's figures cover both passes."""
    out = tmp_path / "out"
    rc = sb.main(["--model-path", tokenizer_dir, "--algorithms", "linearspec", "--concurrency", "1,3",
                  "--max-tokens", "16", "--out-dir", str(out), "--no-progress", "--no-plot",
                  "--schedule", "mixed", "--interleave", "--passes", "2",
                  "--launcher", f"{sys.executable} {fake_server_script}", "--server-start-timeout", "60"])
    assert rc == 0
    data = json.load(open(out / "speedbench.json"))
    assert [s["label"] for s in data["meta"]["servers"]] == ["ar", "linearspec"]
    order = [(r["mode"], r["concurrency"]) for r in map(json.loads, open(out / "speedbench_requests.jsonl"))]
    runs = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert runs == [("ar", 1), ("linearspec", 1), ("ar", 3), ("linearspec", 3)] * 2
    n = sum(len(r.turns) for r in sb.load_rows(sb.STANDIN_PATH))
    for s in data["summary"]:
        if s["category"] == "overall":
            assert s["requests"] == 2 * n and s["errors"] == 0 and s["tok_per_s"] > 0
    with pytest.raises(SystemExit):
        sb.main(["--model-path", tokenizer_dir, "--passes", "2"])  # passes without --interleave


def test_running_servers_prompts_multiturn_and_errors(tmp_path, fake_server_script, tokenizer_dir):
    """--url flow: default label server0, chat template + preclose in the prompt,
    multi-turn feeds the answer back, a failing request is recorded and the exit code says so."""
    import requests

    data = tmp_path / "d.jsonl"
    write_jsonl(data, [row(question_id="a", turns=["hello"]),
                       row(question_id="b", category="qa", turns=["first", "second"], multiturn=True),
                       row(question_id="c", category="qa", turns=["FAIL now", "never sent"], multiturn=True)])
    srv = _start_fake(fake_server_script, tokenizer_dir, "linearspec", tmp_path)
    try:
        out = tmp_path / "out"
        rc = sb.main(["--url", srv.url, "--data", str(data), "--concurrency", "2", "--max-tokens", "4",
                      "--preclose-thinking", "--out-dir", str(out), "--no-progress", "--no-plot",
                      "--warmup", "0", "--save-text"])
        log = requests.get(srv.url + "/log").json()
    finally:
        srv.stop()
    assert rc == 1  # one request failed
    prompts = [b["text"] for b in log]
    assert len(prompts) == 4  # a, b turn 0, b turn 1, c turn 0 (c turn 1 skipped)
    assert all(p.endswith("<|im_start|>assistant\n<think></think>") for p in prompts)
    second = next(p for p in prompts if "second" in p)
    assert "first" in second and "<|im_start|>assistant\nAAAA<|im_end|>" in second.replace("BBBB", "AAAA")
    recs = [json.loads(x) for x in open(out / "speedbench_requests.jsonl")]
    assert {r["mode"] for r in recs} == {"server0"}
    bad = [r for r in recs if not r["ok"]]
    assert len(bad) == 1 and bad[0]["question_id"] == "c" and "HTTP 500" in bad[0]["error"]
    md = (out / "speedbench.md").read_text()
    assert "1 request(s) failed" in md and "| server0 | 2 | 4 | 1 |" in md


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_openai_apis_have_no_plugin_counters(tmp_path, fake_server_script, api):
    srv = _start_fake(fake_server_script, str(tmp_path), "linearspec", tmp_path)
    try:
        out = tmp_path / "out"
        rc = sb.main(["--url", srv.url, "--url-label", "mine", "--api", api, "--concurrency", "2",
                      "--max-tokens", "4", "--categories", "math,coding", "--no-chat-template",
                      "--preclose-thinking", "--out-dir", str(out), "--no-progress", "--no-plot"])
    finally:
        srv.stop()
    assert rc == 0
    summ = json.load(open(out / "speedbench.json"))["summary"]
    ov = next(s for s in summ if s["category"] == "overall")
    assert ov["mode"] == "mine" and ov["output_tokens"] == 4 * ov["requests"] > 0
    assert ov["tokens_per_forward"] is None and ov["ratio_vs_baseline"] is None
    assert "n/a" in (out / "speedbench.md").read_text()


def test_server_that_dies_is_reported_with_log_tail(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('usage: launch_server: error: unrecognized arguments: --algorithm ar')\n"
                      "sys.exit(2)\n")
    srv = ManagedServer("m", "ar", launcher=[sys.executable, str(script)], log_path=str(tmp_path / "l.log"))
    srv.start()
    with pytest.raises(ServerStartError, match="(?s)exited with code 2.*unrecognized arguments.*plugin installed"):
        srv.wait_ready(30, poll=0.1)
    srv.stop()
    out = tmp_path / "out"
    rc = sb.main(["--model-path", "m", "--algorithms", "ar", "--launcher", f"{sys.executable} {script}",
                  "--out-dir", str(out), "--no-progress", "--concurrency", "1", "--no-chat-template"])
    assert rc == 1
    assert "server ar did not start" in (out / "speedbench.md").read_text()


def test_a_server_whose_port_was_taken_is_not_taken_for_ready(tmp_path):
    """free_port's port can be taken by another process before SGLang binds it; whatever then
    answers there is not this server: wait_ready fails naming the port (the test pool starts
    again on another port) instead of reporting it ready."""
    from sglang_nemodiff.servers import ManagedServer, ServerStartError

    log = tmp_path / "server.log"
    server = ManagedServer("/nowhere", "ar", port=40871, log_path=str(log))
    log.write_text("ready soon\n")
    assert not server.port_taken()
    log.write_text("ERROR:    [Errno 98] error while attempting to bind on address "
                   "('127.0.0.1', 40871): address already in use\n")
    assert server.port_taken()
    with pytest.raises(ServerStartError, match="could not bind port 40871"):
        server.wait_ready(timeout=5)
