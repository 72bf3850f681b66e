"""mlx_qlora extract: schema-valid rows by construction, resumable after kill -9, --parallel N equal
to --parallel 1 (greedy), per-row errors and one-line job errors; the real SmolLM2 at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny

pytest.importorskip("llama_cpp")
import jsonschema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASPECTS = json.loads((ROOT / "recipes" / "schemas" / "aspects.json").read_text())
# a tight schema keeps an untrained model's outputs short (its strings are random)
SMALL = {"description": "Extract the aspects.", "type": "object", "required": ["aspects"], "additionalProperties": False,
         "properties": {"aspects": {"type": "array", "maxItems": 2, "items": {
             "type": "object", "required": ["term", "sentiment"], "additionalProperties": False,
             "properties": {"term": {"type": "string", "maxLength": 6},
                            "sentiment": {"enum": ["positive", "negative", "neutral"]}}}}}}
REVIEWS = ["The soup was cold but the staff were lovely.", "Great pizza, slow service.", "I liked the wine.",
           "The room was noisy.", "Prices are fair and the tables are clean.", "Our waiter forgot the bread.",
           "Nice view, bland pasta.", "The dessert menu is short."]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("extract")
    hf = tiny.write_hf_dir(d / "hf", arch="llama", seed=3)
    return tiny.write_gguf(hf, d / "tiny.gguf")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "extract", *map(str, args), "--no-progress",
                        "--threads", "1"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def run(model, inp, out, *extra, **kw):
    from mlx_qlora.apps.extract import ExtractConfig, run_extract

    return run_extract(ExtractConfig(model=str(model), input=str(inp), output=str(out), threads=1, progress=False,
                                     **kw))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.llamacpp
def test_untrained_model_rows_are_schema_valid_and_bad_rows_get_their_own_error(tiny_gguf, tmp_path):
    rows = [{"id": 0, "text": REVIEWS[0]}, '{"id": 1, "text": ', {"id": 2, "body": "no text"}, "",
            {"id": 3, "text": REVIEWS[1]}, {"id": 4, "text": REVIEWS[2]}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run(tiny_gguf, inp, out, parallel=3, max_tokens=1600)   # the full aspects schema, long strings
    got = read(out)
    assert len(got) == 5 and summary["rows"] == 5          # the blank line is not a row
    assert [g.get("id") for g in got] == [0, None, 2, 3, 4]
    assert got[1]["error"].startswith("line 2: not valid JSON") and got[1]["line"] == 2
    assert "no text in field 'text'" in got[2]["error"] and "--text-field" in got[2]["error"]
    for g in (got[0], got[3], got[4]):
        assert "error" not in g
        jsonschema.validate(g["result"], ASPECTS)
    assert summary["results"] == 3 and summary["errors"] == 2
    # the shared prefix ran once: far fewer prompt tokens computed than rows x prompt length
    assert summary["evaluated"] < 3 * summary["tokens_in"]
    costs = summary["costs"]
    assert costs["gpt-4o-mini"] == pytest.approx(summary["tokens_in"] * 0.15 + summary["tokens_out"] * 0.60)


@pytest.mark.llamacpp
def test_parallel_equals_serial_and_text_field(tiny_gguf, tmp_path):
    schema = write_jsonl(tmp_path / "s.json", [SMALL])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"review": r, "n": i} for i, r in enumerate(REVIEWS)])
    outs = {}
    for par in (1, 4):
        out = tmp_path / f"out{par}.jsonl"
        run(tiny_gguf, inp, out, parallel=par, schema=str(schema), text_field="review")
        outs[par] = read(out)
    assert [r["n"] for r in outs[4]] == list(range(len(REVIEWS)))
    assert all("result" in r for r in outs[1])
    assert [r["result"] for r in outs[4]] == [r["result"] for r in outs[1]]


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])   # the embedded SmolLM2's block types
def test_batched_logits_are_bit_identical_to_one_row_at_a_time(qtype, tmp_path):
    """The reason --parallel N = --parallel 1 holds beyond clear margins: every logit a row sees is
    the same float whatever rows run beside it (each sequence in its own KV stream; quantized
    matmuls take one path for one token and for many; F32 weights do not, so they are not used here)."""
    import numpy as np
    from mlx_qlora.model.llama_load import open_llama

    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder, Job, schema_to_gbnf

    tiny_gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", qtype)

    class Recording(BatchDecoder):
        def _pick(self, slot, logits):
            seen.setdefault(slot.job.key, []).append(logits.copy())
            return super()._pick(slot, logits)

    llm = open_llama(tiny_gguf, n_ctx=64, n_threads=1)
    prefix = llm.tokenize(b"Reviews follow. Extract the aspects of each one.", add_bos=True)
    jobs = lambda: [Job(i, prefix + llm.tokenize(r.encode(), add_bos=False)) for i, r in enumerate(REVIEWS)]
    runs = {}
    for par in (1, 4):
        seen: dict = {}
        dec = Recording(llm, schema_to_gbnf(SMALL), prefix, parallel=par, max_tokens=24, slot_tokens=64)
        done = {j.key: j.tokens for j in dec.run(jobs())}
        dec.close()
        runs[par] = done, seen
    (tok1, log1), (tok4, log4) = runs[1], runs[4]
    assert tok4 == tok1 and sum(map(len, log1.values())) > 3 * len(REVIEWS)
    for key in log1:
        assert len(log4[key]) == len(log1[key])
        assert all(np.array_equal(a, b) for a, b in zip(log1[key], log4[key])), key
    llm.close()


@pytest.mark.llamacpp
def test_kill_9_then_rerun_gives_every_row_exactly_once(tiny_gguf, tmp_path):
    schema = write_jsonl(tmp_path / "s.json", [SMALL])
    n = 40
    inp = write_jsonl(tmp_path / "in.jsonl", [{"i": i, "text": REVIEWS[i % len(REVIEWS)] + f" ({i})"} for i in range(n)])
    full = tmp_path / "full.jsonl"
    run(tiny_gguf, inp, full, parallel=2, schema=str(schema))
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "mlx_qlora.cli", "extract", str(tiny_gguf), "--input", str(inp), "--output", str(out),
            "--schema", str(schema), "--parallel", "2", "--threads", "1", "--no-progress"]

    def start_and_stop(sig, at_least):
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not SIG_IGN from `&`
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < at_least):
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        stdout, _ = proc.communicate(timeout=60)
        kept = out.read_text().count("\n")
        assert at_least <= kept < n, "the job finished before it could be stopped; give it more rows"
        return proc.returncode, stdout, kept

    rc, stdout, kept = start_and_stop(signal.SIGINT, 3)            # Ctrl-C: finished rows stay
    assert rc == 130 and f"interrupted: {kept} of {n} rows are in" in stdout
    rc, _, kept2 = start_and_stop(signal.SIGKILL, kept + 3)        # kill -9 on the resumed run
    assert rc == -signal.SIGKILL and kept2 > kept
    with open(out, "a") as f:            # a row torn in the middle of its write
        f.write('{"i": 999, "text": "half a li')
    cli(tiny_gguf, "--input", inp, "--output", out, "--schema", schema, "--parallel", "2")
    got = read(out)
    assert [r["i"] for r in got] == list(range(n))
    assert got == read(full)               # same rows, same greedy results as one uninterrupted run
    again = cli(tiny_gguf, "--input", inp, "--output", out, "--schema", schema)
    assert read(out) == got and f"rows: {n} of {n}" in again.stdout and "(0 this run" in again.stdout


@pytest.mark.llamacpp
def test_job_errors_are_one_line(tiny_gguf, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    bad_ref = write_jsonl(tmp_path / "ref.json", [{"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}])
    not_schema = write_jsonl(tmp_path / "ns.json", [{"type": "strin"}])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    cases = [(["--input", empty], "no rows (the file is empty)"),
             (["--input", inp, "--schema", bad_ref], "llama.cpp cannot turn the JSON schema into a grammar"),
             (["--input", inp, "--schema", not_schema], "not a valid JSON schema"),
             (["--input", tmp_path / "missing.jsonl"], "file not found"),
             (["--input", inp, "--parallel", "0"], "--parallel 0")]
    for args, message in cases:
        out = tmp_path / "o.jsonl"
        p = cli(tiny_gguf, *args, "--output", out, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
        assert not out.exists()


def test_plain_text_input_on_mlx_with_llguidance(tiny_hf_llama, tmp_path_factory, tmp_path):
    from lora_fixtures import converted

    model = converted(tmp_path_factory, tiny_hf_llama, "extract_mlx")
    schema = write_jsonl(tmp_path / "s.json", [SMALL])
    inp = tmp_path / "reviews.txt"
    inp.write_text("\n".join(REVIEWS[:3]) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run(model, inp, out, engine="mlx", schema=str(schema))
    got = read(out)
    assert [g["text"] for g in got] == REVIEWS[:3] and summary["engine"] == "mlx"
    for g in got:
        jsonschema.validate(g["result"], SMALL)


@pytest.mark.real
@pytest.mark.llamacpp
def test_smollm2_reviews_valid_and_parallel_matches_serial(smollm2_gguf, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS[:4]])
    outs = {}
    for par in (1, 2):
        out = tmp_path / f"o{par}.jsonl"
        run(smollm2_gguf, inp, out, parallel=par, max_tokens=400)
        outs[par] = read(out)
    for g in outs[2]:
        jsonschema.validate(g["result"], ASPECTS)
    assert outs[1] == outs[2]


@pytest.mark.llamacpp
def test_span_field_terms_are_copied_from_the_text(tiny_gguf, tmp_path):
    from mlx_qlora.apps.answer import text_spans

    assert text_spans("the lobster/mango summer roll, great!", 20)[:3] == ["the", "the lobster", "the lobster/mango"]
    schema = write_jsonl(tmp_path / "s.json", [{**SMALL, "properties": {"aspects": {**SMALL["properties"]["aspects"],
        "items": {**SMALL["properties"]["aspects"]["items"], "properties": {
            "term": {"type": "string", "maxLength": 20}, "sentiment": {"enum": ["positive", "negative"]}}}}}}])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS[:3]])
    out = tmp_path / "out.jsonl"
    run(tiny_gguf, inp, out, parallel=2, schema=str(schema), span_field="term")
    got = read(out)
    terms = [(g["text"], a["term"]) for g in got for a in g["result"]["aspects"]]
    assert len(got) == 3 and terms and all(t in text for text, t in terms)
