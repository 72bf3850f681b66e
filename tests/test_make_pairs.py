"""`mlx_qlora make-pairs` (apps/pairs.py): a model's wrong answers on training rows become DPO
pairs (chosen = reference, rejected = its answer); right answers are skipped; the file trains."""
from __future__ import annotations

import json

import mlx_qlora  # noqa: F401
from click.testing import CliRunner

from mlx_qlora.apps.pairs import wrong
from mlx_qlora.cli import main
from mlx_qlora.train.config import load_config
from mlx_qlora.train.loop import train

QA = [("What is the capital of France?", "Paris"), ("Name a prime number.", "7"),
      ("Colour of the sky?", "blue"), ("Two plus three?", "five"), ("Opposite of up?", "down")]


def test_wrong_compares_whitespace_and_json_values():
    assert not wrong(" Paris ", "Paris") and not wrong("a  b", "a b")
    assert not wrong('{"b": 1, "a": [2]}', '{"a":[2],"b":1}')   # key order / spacing are no mistake
    assert wrong('{"a": 1}', '{"a": 2}') and wrong("Lyon", "Paris") and wrong("{", "{}")


def run(args):
    return CliRunner().invoke(main, ["make-pairs", *map(str, args)])


def test_make_pairs_from_own_answers_then_dpo(tiny_llama_q4, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": q, "completion": a} for q, a in QA]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    r = run([tiny_llama_q4, "--data", d, "-o", out, "--engine", "mlx", "--max-tokens", "6"])
    assert r.exit_code == 0, r.output
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pairs) == len(QA)   # a random model answers none right
    for p, (q, a) in zip(pairs, QA):
        assert p["prompt"] == [{"role": "user", "content": q}] and p["chosen"] == [{"role": "assistant", "content": a}]
        assert p["rejected"][0]["role"] == "assistant" and wrong(p["rejected"][0]["content"], a)
    # a row whose reference is what the model answers is right: skipped
    rows[1]["completion"] = pairs[1]["rejected"][0]["content"]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out2 = tmp_path / "pairs2.jsonl"
    r = run([tiny_llama_q4, "--data", d / "train.jsonl", "-o", out2, "--engine", "mlx", "--max-tokens", "6"])
    assert r.exit_code == 0 and "4 of 5 rows answered wrong" in r.output, r.output
    assert [p["source_line"] for p in map(json.loads, out2.read_text().splitlines())] == [1, 3, 4, 5]
    # the pairs train (chat form with an explicit prompt)
    s = train(load_config(None, {"model": str(tiny_llama_q4), "data.train": str(out), "out_dir": str(tmp_path / "dpo"),
                                 "method": "dpo", "steps": 2, "batch_size": 2, "progress": False,
                                 "lora.rank": 4, "lora.alpha": 8.0}))
    assert s["steps"] == 2
    # refused: an existing output without --force, text rows (no prompt to pair with)
    r = run([tiny_llama_q4, "--data", d, "-o", out, "--engine", "mlx"])
    assert r.exit_code == 2 and "exists" in r.output
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "Q: a\nA: b"}) + "\n")
    r = run([tiny_llama_q4, "--data", tmp_path / "text.jsonl", "-o", tmp_path / "p3.jsonl", "--engine", "mlx"])
    assert r.exit_code == 2 and "completions or chat rows" in r.output, r.output
    assert not (tmp_path / "p3.jsonl").exists()
