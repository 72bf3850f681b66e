"""mlx_qlora eval: the eval loss is the training loss, perplexity is exp of an independently
computed mean token loss, a fresh adapter changes nothing, MLX and llama.cpp agree, the task
metric counts what it should, and bad input is one line with exit 2."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tiny
from lora_fixtures import ALL, converted, write_adapter
from test_cli_errors import assert_one_line_error, run_cli

ROWS = [f"table: t{i}\ncolumns: name, age, city\nQ: who is {i} years old\nA: SELECT name FROM t{i} WHERE age = {i}"
        for i in range(7)] + ["Q: short\nA: x"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    (d / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ROWS))
    (d / "valid.jsonl").write_text("".join(json.dumps({"prompt": t.rsplit("A:", 1)[0] + "A:",
                                                       "completion": t.rsplit("A:", 1)[1]}) + "\n" for t in ROWS))
    return d


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_q4):
    return write_adapter(tmp_path_factory.mktemp("eval_adapter") / "a", tiny_llama_q4, targets=ALL, b_std=0.2)


def _eval(model, data, **kw):
    from mlx_qlora.eval.config import EvalConfig
    from mlx_qlora.eval.loss import evaluate_loss

    return evaluate_loss(EvalConfig(model=str(model), data=str(data), **kw), say=lambda *_: None)


def _training_fns(model_dir, adapter_dir=None, cpu_engine=True):
    from mlx_qlora.train.lora import load_adapter
    from mlx_qlora.train.loop import load_base, make_step_fns, prepare_model

    model, tok = load_base(str(model_dir))
    model.freeze()
    prepare_model(model)
    if adapter_dir:
        load_adapter(model, adapter_dir)
    return make_step_fns(model, use_cpu_engine=cpu_engine, say=lambda *_: None), tok, model


@pytest.mark.parametrize("split", ["test", "valid"])   # text rows; completions rows (prompt masked)
def test_eval_loss_is_the_training_loss(tiny_llama_q4, data, adapter, split):
    from mlx_qlora.train.config import DataConfig
    from mlx_qlora.train.data import batch_order, collate, encode_jsonl
    from mlx_qlora.train.loop import evaluate

    res = _eval(tiny_llama_q4, data, adapter=str(adapter), split=split, batch_size=3)
    fns, tok, _ = _training_fns(tiny_llama_q4, adapter)
    examples, _, _ = encode_jsonl(data / f"{split}.jsonl", tok, DataConfig(train=str(data)))
    # training's own validation over every batch: the same number, bit for bit
    assert res.loss == evaluate(fns.loss, examples, 3, 0, 0)
    assert res.loss_tokens == sum(int(e.mask[1:].sum()) for e in examples)
    assert res.tokens == sum(len(e.tokens) - 1 for e in examples)
    if split == "valid":
        assert res.loss_tokens < res.tokens          # the prompt is masked out of the loss
    # and MLX autodiff's loss function on the same batches agrees
    mlx_fns, _, _ = _training_fns(tiny_llama_q4, adapter, cpu_engine=False)
    total = sum(mlx_fns.loss(collate([examples[i] for i in b])) for b in batch_order(
        [len(e.tokens) for e in examples], 3, 0, 0))
    assert total / res.loss_tokens == pytest.approx(res.loss, rel=1e-4)


def test_perplexity_is_exp_of_mean_token_loss(tiny_llama_q4, data):
    import mlx.core as mx

    from mlx_qlora.train.config import DataConfig
    from mlx_qlora.train.data import encode_jsonl

    res = _eval(tiny_llama_q4, data)
    _, tok, model = _training_fns(tiny_llama_q4)
    examples, _, _ = encode_jsonl(data / "test.jsonl", tok, DataConfig(train=str(data)))
    losses = []
    for e in examples:   # full logits, log-softmax in float64, loss where the mask says
        logits = np.array(model(mx.array(e.tokens[None, :-1]))[0].astype(mx.float32), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        pos = np.flatnonzero(e.mask[1:])
        losses.extend(-logp[pos, e.tokens[1:][pos]])
    assert res.loss == pytest.approx(np.mean(losses), rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    assert res.loss_tokens == len(losses) and res.tokens_per_s > 0


def test_fresh_adapter_evaluates_like_the_base(tiny_llama_q4, data, tmp_path):
    from mlx_qlora.train.config import LoraConfig
    from mlx_qlora.train.lora import apply_lora, save_adapter
    from mlx_qlora.train.loop import load_base

    model, _ = load_base(str(tiny_llama_q4))
    apply_lora(model, LoraConfig(rank=4, layers="all"))   # lora_b = 0: a fresh adapter
    save_adapter(model, tmp_path / "fresh", base_model=str(tiny_llama_q4))
    base = _eval(tiny_llama_q4, data)
    fresh = _eval(tiny_llama_q4, data, adapter=str(tmp_path / "fresh"))
    assert fresh.loss == base.loss and fresh.loss_tokens == base.loss_tokens


@pytest.mark.llamacpp
def test_mlx_and_gguf_score_the_same_tokens_alike(tiny_hf_llama, tmp_path_factory, data):
    """A float32 model in MLX and as GGUF F32 through llama.cpp: same tokens, same loss."""
    mlx_dir = converted(tmp_path_factory, tiny_hf_llama, "tiny_llama_f32", quantize=False, dtype="float32")
    gguf = tiny.write_gguf(tiny_hf_llama, tmp_path_factory.mktemp("eval_gguf") / "m.gguf", "F32")
    a = _eval(mlx_dir, data)
    b = _eval(gguf, data)
    assert (a.loss_tokens, a.tokens) == (b.loss_tokens, b.tokens)
    assert b.engine.startswith("llama.cpp") and a.engine != b.engine
    assert b.loss == pytest.approx(a.loss, rel=1e-3)


@pytest.mark.llamacpp
def test_quant_sweep_table(tiny_llama_q4, data, tmp_path):
    from mlx_qlora.eval.config import EvalConfig
    from mlx_qlora.eval.run import run_eval

    out = tmp_path / "sweep"
    res = run_eval(EvalConfig(model=str(tiny_llama_q4), data=str(data), quant_sweep=True, bits=(16, 8, 2), group_size=32,
                              gguf_types=("f16", "q8_0", "q4_1"), out=str(out)), say=lambda *_: None)
    rows = res["rows"]
    assert list(rows) == ["source", "mlx16", "mlx8", "mlx2", "gguf-f16", "gguf-q8_0", "gguf-q4_1"]
    loss = {k: r["loss"] for k, r in rows.items()}   # (a random model: ppl ~1e20, so compare its log)
    print({k: round(v, 5) for k, v in loss.items()})
    # the source is 4-bit: its float16 dequantization scores the same, 8-bit stays close, 2-bit does not
    assert loss["mlx16"] == pytest.approx(loss["source"], rel=1e-3)
    assert abs(loss["mlx8"] / loss["mlx16"] - 1) < 0.003 < 0.03 < abs(loss["mlx2"] / loss["mlx16"] - 1)
    assert abs(loss["gguf-q8_0"] / loss["gguf-f16"] - 1) < 0.003
    assert loss["gguf-f16"] == pytest.approx(loss["mlx16"], rel=3e-3)
    assert loss["gguf-q4_1"] == pytest.approx(loss["source"], rel=3e-3)   # blocks copied exactly
    sizes = {k: r["size_bytes"] for k, r in rows.items()}
    assert sizes["mlx2"] < sizes["mlx8"] < sizes["mlx16"] and sizes["gguf-q4_1"] < sizes["gguf-q8_0"] < sizes["gguf-f16"]
    assert rows["mlx16"]["bits_per_weight"] == pytest.approx(16, abs=0.01)
    table = (out / "quant_table.md").read_text()
    assert table.count("\n| ") == 8 and "| +0.00% |" in table   # header + 7 rows; 16-bit vs itself
    assert (out / "quant_table.png").stat().st_size > 5000
    code, text = run_cli("eval", tiny_llama_q4, "--quant-sweep", "--data", data, "-o", out, "--bits", "8", "--gguf-types", "none")
    assert_one_line_error(code, text, "--force")    # nothing silently overwritten


@pytest.mark.llamacpp
def test_exact_match_counts_hits(tiny_llama_q4, data, tmp_path):
    """Make row 1's reference the model's own greedy answer: exactly that row is a hit."""
    from mlx_qlora.eval.config import EvalConfig
    from mlx_qlora.eval.run import run_eval

    def run(d, lines):
        return run_eval(EvalConfig(model=str(tiny_llama_q4), data=str(d), task="exact-match", answer_prefix="A:", max_rows=3,
                                   engine="llama.cpp"), say=lines.append)

    first = run(data, [])
    assert first["rows"] == 3 and first["engine"] == "llama.cpp"
    answer = first["examples"][1]["answer"]
    assert answer and first["exact_match"] == 0.0
    (tmp_path / "test.jsonl").write_text("".join(
        json.dumps({"text": t.rsplit("A:", 1)[0] + "A: " + (answer if i == 1 else "nothing alike")}) + "\n"
        for i, t in enumerate(ROWS[:3])))
    lines = []
    second = run(tmp_path, lines)
    assert second["exact_match"] == pytest.approx(1 / 3)
    assert [e["exact"] for e in second["examples"]] == [False, True, False]
    assert any("worst 2" in line for line in lines) and any("nothing alike" in line for line in lines)


def test_bad_data_task_and_adapter_are_one_line(tiny_llama_q4, data, tmp_path, tmp_path_factory):
    code, out = run_cli("eval", tiny_llama_q4, "--data", tmp_path / "missing.jsonl")
    assert_one_line_error(code, out, "missing.jsonl")
    code, out = run_cli("eval", tiny_llama_q4, "--data", data, "--split", "train")
    assert_one_line_error(code, out, "train.jsonl", "--split")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    code, out = run_cli("eval", tiny_llama_q4, "--data", tmp_path / "bad.jsonl")
    assert_one_line_error(code, out, "line 2")
    code, out = run_cli("eval", tiny_llama_q4, "--data", data, "--task", "bleu")
    assert_one_line_error(code, out, "bleu", "exact-match")
    code, out = run_cli("eval", tiny_llama_q4, "--data", data, "--task", "exact-match")
    assert_one_line_error(code, out, "--answer-prefix")
    other = converted(tmp_path_factory, tiny.write_hf_dir(tmp_path / "other_hf", hidden=32, intermediate=64),
                      "tiny_other", q_group_size=32)
    wrong = write_adapter(tmp_path / "wrong", other, targets=ALL)
    code, out = run_cli("eval", tiny_llama_q4, "--adapter", wrong, "--data", data)
    assert_one_line_error(code, out, "adapter")


@pytest.mark.llamacpp
def test_json_fields_task_scores_through_json_fields(tiny_llama_q4, tmp_path):
    """Completions whose answers are JSON: scored by eval/json_fields.py (a random model writes
    no valid JSON, so validity and every field's accuracy are 0, and every row is listed)."""
    from mlx_qlora.eval.config import EvalConfig
    from mlx_qlora.eval.run import run_eval

    refs = [{"aspects": [{"term": "food", "sentiment": "positive"}], "overall": "positive"},
            {"aspects": [], "overall": "neutral"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": f"review {i}", "completion": json.dumps(r)})
                                                 + "\n" for i, r in enumerate(refs)))
    lines = []
    res = run_eval(EvalConfig(model=str(tiny_llama_q4), data=str(tmp_path), task="json-fields", engine="llama.cpp"),
                   say=lines.append)
    assert res["n"] == 2 and res["json_validity"] == 0.0 and res["term_recall"] == 0.0
    assert res["field_accuracy"] == {"aspects": 0.0, "overall": 0.0}
    assert any("JSON valid 0.0%" in line for line in lines)
