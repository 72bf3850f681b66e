"""extract --answer compact and grounded terms: the compact grammar takes exactly the lines that
CompactForm writes (llama.cpp's grammar sampler and llguidance, token by token), extract's rows are
schema-valid, equal at any --parallel and with drafts, grounded terms are spans of their review in
both answer forms (tiny models and the real SmolLM2), and bad options are one line, exit 2."""
from __future__ import annotations

import copy
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from test_extract import REVIEWS, read, run, write_jsonl

pytest.importorskip("llama_cpp")
import jsonschema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mams"
ASPECTS = json.loads((ROOT / "recipes" / "schemas" / "aspects.json").read_text())


def aspects(max_items: int = 12, max_len: int = 60, min_items: int = 0) -> dict:
    """aspects.json (its term still marked x-span-of-text) with fewer items / shorter terms (an
    untrained model may fill every item it may, this bounds its output) or at least ``min_items``
    (the tiny random model ends a compact answer at once: its argmax at the start is the eos)."""
    s = copy.deepcopy(ASPECTS)
    s["properties"]["aspects"]["maxItems"] = max_items
    s["properties"]["aspects"]["minItems"] = min_items
    s["properties"]["aspects"]["items"]["properties"]["term"]["maxLength"] = max_len
    return s


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory) -> Path:
    # Q8_0: a row's logits are bit-identical at any --parallel (llamacpp_batch.py)
    d = tmp_path_factory.mktemp("compact")
    return tiny.write_gguf(tiny.write_hf_dir(d / "hf", arch="llama", seed=3), d / "tiny.gguf", "Q8_0")


def spans_of(text):
    from mlx_qlora.apps.answer import text_spans

    return set(text_spans(text))


# ---- (a) the grammar, token by token --------------------------------------------------------------
class LlamaGrammar:
    """llama.cpp's grammar sampler (what BatchDecoder runs) over a model's vocabulary."""

    def __init__(self, llm):
        import llama_cpp as lc

        self.lc, self.llm, self.vocab = lc, llm, lc.llama_model_get_vocab(llm.model)
        self.eos = llm.token_eos()
        self.one = (lc.llama_token_data * 1)()

    def accepts(self, gbnf: str, text: str) -> bool:
        """Every token of ``text`` allowed in turn, then the end of generation."""
        lc = self.lc
        s = lc.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert s, gbnf[:200]

        def ok(t):
            self.one[0].id, self.one[0].logit, self.one[0].p = t, 1.0, 0.0
            lc.llama_sampler_apply(s, ctypes.byref(lc.llama_token_data_array(self.one, 1, -1, False)))
            return self.one[0].logit == 1.0
        try:
            for t in self.llm.tokenize(text.encode(), add_bos=False, special=False):
                if not ok(t):
                    return False
                lc.llama_sampler_accept(s, t)
            return ok(self.eos)
        finally:
            lc.llama_sampler_free(s)


class GuidanceGrammar:
    """llguidance's matcher (what the MLX engine runs) over the same vocabulary."""

    def __init__(self, llm):
        from mlx_qlora.infer.engines.drafts import llg_tokenizer

        self.llm, self.tok, self.eos = llm, llg_tokenizer(llm), llm.token_eos()

    def accepts(self, lark: str, text: str) -> bool:
        import llguidance

        m = llguidance.LLMatcher(self.tok, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        assert not m.is_error(), m.get_error()
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=False) + [self.eos]
        return m.validate_tokens(ids) == len(ids)


@pytest.fixture(scope="module")
def grammars(smollm2_gguf):
    from mlx_qlora.model.llama_load import open_llama

    llm = open_llama(smollm2_gguf, n_ctx=64, n_threads=1)
    yield LlamaGrammar(llm), GuidanceGrammar(llm)
    llm.close()


def test_edge_and_inner_characters_are_what_python_strips_and_splits_at():
    from mlx_qlora.apps import compact_grammar as cg

    stripped = {c for c in range(0x110000) if chr(c).isspace()}
    banned_edge = {c for lo, hi in cg.EDGE_BANNED for c in range(lo, hi + 1)}
    assert stripped <= banned_edge and banned_edge - stripped == {c for lo, hi in cg.INNER_BANNED
                                                                  for c in range(lo, hi + 1)} - stripped
    assert not cg.writable(" food") and not cg.writable("food\u00a0") and not cg.writable("a\u2028b")
    assert cg.writable("crème brûlée") and cg.writable("a b")


def test_compact_prompt_is_the_training_rows_and_grounding_comes_from_the_schema():
    from mlx_qlora.apps.answer import Answer
    from mlx_qlora.infer.compact import CompactForm
    from mlx_qlora.infer.schema_file import load_schema

    schema = load_schema()         # aspects.json: what prepare-reviews --answer compact writes rows from
    answer = Answer.of(schema, "compact")
    assert answer.instruction() == CompactForm.from_schema(schema).instruction(schema) == \
        "Review aspects: one line per item: term sentiment"
    assert answer.grounded == {"term"} and "x-span-of-text" not in json.dumps(answer.schema)
    assert Answer.of(schema, "json", "none").grounded == set() and Answer.of(schema, "json").grounded == {"term"}


@pytest.mark.real
def test_grammar_accepts_every_mams_val_answer_and_rejects_malformed_lines(grammars):
    from mlx_qlora.apps import compact_grammar as cg
    from mlx_qlora.infer.compact import CompactForm
    from mlx_qlora.apps.answer import text_spans
    from mlx_qlora.infer.schema_file import unmarked
    from mlx_qlora.apps.reviews import read_mams

    form = CompactForm.from_schema(unmarked(ASPECTS))
    free, free_lark = cg.gbnf(form), cg.lark(form)
    rows = grounded = 0
    for text, ref in read_mams(MAMS / "val.xml"):
        answer = form.to_text(ref)
        for g in grammars:
            assert g.accepts(free if g is grammars[0] else free_lark, answer), answer
        spans = text_spans(text, 60)
        if all(a["term"] in spans for a in ref["aspects"]):   # 499 of 500 rows (one 9-word term)
            grounded += 1
            assert grammars[0].accepts(cg.gbnf(form, spans), answer), answer
            assert grammars[1].accepts(cg.lark(form, spans), answer), answer
        rows += 1
    assert rows == 500 and grounded >= 499

    bad = [" food great\n", " food  positive\n", " food positive \n", "  positive\n", " food positive",
           " foodpositive\n", " fo\tod positive\n", " food positive\n\n", " food Positive\n", " " + "x" * 61 + " positive\n",
           " drinks neutral\n" * 13, " negative\n", "  food positive\n"]
    good = ["", " drinks neutral\n" * 12, " " + "x" * 60 + " positive\n", " crème brûlée positive\n", " a b neutral\n",
            " positive vibe neutral\n", "food positive\n"]   # the lead is optional (compact_grammar)
    for text in bad + good:
        for g, grammar in zip(grammars, (free, free_lark)):
            assert g.accepts(grammar, text) == (text in good), (type(g).__name__, text)
    # grounded: spans of the review only (escaped: quotes and backslashes are literal text)
    review = 'The "lobster\\mango" roll was great, the waiter\'s mood less so.'
    spans = text_spans(review, 60)
    for g, grammar in zip(grammars, (cg.gbnf(form, spans), cg.lark(form, spans))):
        for text, ok in [(' lobster\\mango" roll positive\n', True), (" waiter negative\n", True),
                         (" waiter's mood negative\n", True), (" lobster mango roll positive\n", False),
                         (" pizza positive\n", False), (" roll was great, the positive\n", True),
                         (" roll was great positive\n", True), (" roll was great\n", False),
                         ("waiter negative\n", True), ("  waiter negative\n", False)]:
            assert g.accepts(grammar, text) == ok, (type(g).__name__, text)
    # at least one item: the empty answer is refused; no span fits: only the empty list
    one = CompactForm.from_schema({**unmarked(ASPECTS), "properties": {"aspects": {
        **ASPECTS["properties"]["aspects"], "minItems": 1}}})
    assert not grammars[0].accepts(cg.gbnf(one), "") and not grammars[1].accepts(cg.lark(one), "")
    assert grammars[0].accepts(cg.gbnf(form, ["!!"]), "") and grammars[1].accepts(cg.lark(form, ["!!"]), "")
    with pytest.raises(ValueError, match="no span of the text fits term"):
        cg.gbnf(one, [" x"])


# ---- (b, c) extract on tiny models ----------------------------------------------------------------
@pytest.mark.llamacpp
def test_compact_rows_valid_grounded_and_parallel_1_equals_4_byte_for_byte(tiny_q8, tmp_path):
    from mlx_qlora.apps.answer import text_spans

    inp = write_jsonl(tmp_path / "in.jsonl", [{"n": i, "text": r} for i, r in enumerate(REVIEWS)])
    schema = write_jsonl(tmp_path / "s.json", [aspects(min_items=2)])
    outs = {}
    for par in (1, 4):
        out = tmp_path / f"c{par}.jsonl"
        summary = run(tiny_q8, inp, out, parallel=par, answer="compact", max_tokens=800, schema=str(schema))
        assert summary["rows"] == len(REVIEWS) and summary["results"] == len(REVIEWS), summary
        outs[par] = out.read_bytes()
    assert outs[1] == outs[4]
    got = read(tmp_path / "c1.jsonl")
    terms = [(g["text"], a["term"]) for g in got for a in g["result"]["aspects"]]
    for g in got:
        jsonschema.validate(g["result"], ASPECTS)
    assert len(terms) >= 2 * len(REVIEWS) and all(t in text_spans(text, 60) for text, t in terms)
    # the same rows with --span-field none: free text, which a random model does not copy
    out = tmp_path / "free.jsonl"
    run(tiny_q8, inp, out, parallel=4, answer="compact", span_field="none", max_tokens=1600, schema=str(schema))
    free = [(g["text"], a["term"]) for g in read(out) for a in g.get("result", {"aspects": []})["aspects"]]
    assert free and sum(t not in spans_of(text) for text, t in free) > len(free) // 2


@pytest.mark.llamacpp
def test_grounded_json_default_and_compact_drafts_give_the_same_rows(tiny_q8, tmp_path):
    schema = write_jsonl(tmp_path / "s.json", [aspects(3, 20, min_items=1)])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS])
    out = tmp_path / "json.jsonl"
    run(tiny_q8, inp, out, parallel=4, schema=str(schema), max_tokens=400)   # grounded: the schema's mark
    got = read(out)
    terms = [(g["text"], a["term"]) for g in got for a in g["result"]["aspects"]]
    assert len(got) == len(REVIEWS) and terms and all(t in spans_of(text) for text, t in terms)
    rows = {}
    for drafts in ("off", "all"):
        rows[drafts] = tmp_path / f"d{drafts}.jsonl"
        run(tiny_q8, inp, rows[drafts], parallel=3, schema=str(schema), answer="compact", drafts=drafts)
    assert rows["off"].read_bytes() == rows["all"].read_bytes() and all("result" in g for g in read(rows["off"]))


def test_compact_grounded_on_mlx_with_llguidance(tiny_hf_llama, tmp_path_factory, tmp_path):
    from lora_fixtures import converted

    model = converted(tmp_path_factory, tiny_hf_llama, "extract_mlx")
    schema = write_jsonl(tmp_path / "s.json", [aspects(2, 20, min_items=1)])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS[:3]])
    out = tmp_path / "out.jsonl"
    summary = run(model, inp, out, engine="mlx", schema=str(schema), answer="compact", max_tokens=200)
    got = read(out)
    assert summary["engine"] == "mlx" and summary["results"] == 3, [g.get("error") for g in got]
    terms = [(g["text"], a["term"]) for g in got for a in g["result"]["aspects"]]
    assert terms and all(t in spans_of(text) for text, t in terms)


# ---- (c) the real SmolLM2 ----------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.llamacpp
def test_smollm2_grounded_terms_in_both_forms_and_scoring(smollm2_gguf, tmp_path):
    from mlx_qlora.apps.reviews import read_mams
    from mlx_qlora.eval.json_fields import score_file

    rows = [{"text": t, "reference": r} for t, r in list(read_mams(MAMS / "val.xml"))[:16]]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    schema = write_jsonl(tmp_path / "s.json", [aspects(2, 30)])   # a base model fills all it may: bound it
    for answer in ("json", "compact"):
        out = tmp_path / f"{answer}.jsonl"
        run(smollm2_gguf, inp, out, parallel=4, schema=str(schema), answer=answer, max_tokens=200)
        got = read(out)
        assert [g["text"] for g in got] == [r["text"] for r in rows]
        terms = [(g["text"], a["term"]) for g in got for a in g["result"]["aspects"]]
        assert len(terms) >= 16 and all(t in spans_of(text) for text, t in terms), answer
        s = score_file(str(out))       # results are JSON in either form: scored unchanged
        assert s["n"] == 16 and s["json_validity"] == 1.0 and 0.0 <= s["pair_f1"] <= s["term_f1"] <= 1.0


# ---- (e) bad input --------------------------------------------------------------------------------
@pytest.mark.llamacpp
def test_bad_answer_and_span_field_options_are_one_line(tiny_q8, tmp_path):
    flat = write_jsonl(tmp_path / "flat.json", [{"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "string"}}}])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    cases = [(["--answer", "compact", "--schema", flat], "use --answer json"),
             (["--span-field", "dish"], "--span-field 'dish': the schema has no string property"),
             (["--span-field", "sentiment"], "name one of them, or none"),
             (["--answer", "yaml"], "'yaml' is not one of")]
    for args, message in cases:
        out = tmp_path / "o.jsonl"
        p = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "extract", str(tiny_q8), "--input", str(inp),
                            "--output", str(out), "--no-progress", *map(str, args)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        lines = [x for x in p.stderr.strip().splitlines() if x.startswith(("error", "Error"))]
        assert p.returncode == 2 and "Traceback" not in p.stderr and message in p.stderr, p.stderr
        assert len(lines) == 1 and not out.exists()


# ---- eval --task json-fields on compact rows ------------------------------------------------------
@pytest.mark.llamacpp
def test_eval_json_fields_expands_compact_answers(tiny_q8, tmp_path):
    from mlx_qlora.infer.compact import CompactForm
    from mlx_qlora.infer.schema_file import unmarked
    from mlx_qlora.eval.config import EvalConfig, TaskConfig
    from mlx_qlora.eval.json_fields import score_json_fields
    from mlx_qlora.eval.run import run_eval
    from mlx_qlora.eval.tasks import _compact_form, _expand
    from mlx_qlora.errors import UserError

    form = _compact_form(TaskConfig(type="json-fields", answer="compact"))
    assert form == CompactForm.from_schema(unmarked(ASPECTS))
    ref = {"aspects": [{"sentiment": "positive", "term": "lobster roll"}, {"sentiment": "negative", "term": "decor"}]}
    lines = form.to_text(ref)
    assert _expand(form, lines.rstrip()) == _expand(form, lines.strip()) == ref and _expand(form, "") == {"aspects": []}
    assert _expand(form, " decor great") is None
    s = score_json_fields([_expand(form, lines), _expand(form, " decor positive\n great")], [ref, ref])
    assert s["json_validity"] == 0.5 and s["term_recall"] == 0.5 and s["pair_f1"] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="task.answer='compact' is for --task json-fields"):
        TaskConfig(type="exact-match", answer="compact")

    rows = [{"messages": [{"role": "system", "content": form.instruction(ASPECTS)}, {"role": "user", "content": r},
                          {"role": "assistant", "content": lines}]} for r in REVIEWS[:2]]
    write_jsonl(tmp_path / "test.jsonl", rows)
    res = run_eval(EvalConfig(model=str(tiny_q8), data=str(tmp_path), task="json-fields", answer="compact",
                              engine="llama.cpp", max_rows=2), say=lambda *_: None)
    valid = [_expand(form, e["answer"]) is not None for e in res["examples"]]
    assert res["n"] == 2 and res["json_validity"] == sum(valid) / 2 and res["field_accuracy"].keys() == {"aspects"}
