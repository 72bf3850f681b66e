"""Drafts in the batched llama.cpp decoder (forced tokens from llguidance, prompt lookup): the same
greedy tokens -- and the same float logits at every position -- as one token per row per step."""
from __future__ import annotations

from pathlib import Path

import pytest

import tiny
from test_extract import REVIEWS, SMALL, read, run, write_jsonl

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

ROOT = Path(__file__).resolve().parent.parent


def open_llama(path, **kw):
    from mlx_qlora.model.llama_load import open_llama as central

    return central(path, **kw)


def decode(llm, schema, prompts, prefix, parallel, drafter, max_tokens=40, prefill="own"):
    """{row: tokens}, {row: logits at each pick}, the decoder's counts."""
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder, Job, schema_to_gbnf

    seen: dict = {}

    class Recording(BatchDecoder):
        def _pick(self, slot, logits):
            seen.setdefault(slot.job.key, []).append(logits.copy())
            return super()._pick(slot, logits)

    dec = Recording(llm, schema_to_gbnf(schema), prefix, parallel=parallel, max_tokens=max_tokens, slot_tokens=96,
                    drafter=drafter, prefill=prefill)
    try:
        done = {j.key: j.tokens for j in dec.run([Job(i, p) for i, p in enumerate(prompts)])}
    finally:
        dec.close()
    return done, seen, dec.counts


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])   # the embedded SmolLM2's block types
def test_drafts_give_the_tokens_and_logits_of_one_token_per_step(qtype, tmp_path):
    import numpy as np

    from mlx_qlora.infer.engines.drafts import Drafter

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", qtype)
    llm = open_llama(gguf, n_ctx=64, n_threads=1)
    prefix = llm.tokenize(b"Reviews follow. Extract the aspects of each one.", add_bos=True)
    prompts = [prefix + llm.tokenize(r.encode(), add_bos=False) for r in REVIEWS]
    tok1, log1, plain = decode(llm, SMALL, prompts, prefix, 1, None)
    assert plain.forced == plain.lookup == plain.rejected == 0
    assert plain.sampled == sum(map(len, tok1.values())) and plain.steps >= max(map(len, tok1.values()))
    sources = [dict(forced=True, lookup=False, habits=False), dict(forced=False, lookup=True, habits=False),
               dict(forced=False, lookup=False, habits=True), dict()]
    for parallel, kw, prefill in zip((1, 3, 2, 4), sources, ("own", "even", "wave", "even")):   # prompts in steps too
        tok, logits, counts = decode(llm, SMALL, prompts, prefix, parallel, Drafter(llm, SMALL, **kw), prefill=prefill)
        assert tok == tok1, kw
        for key in log1:   # one pick per output token (+ the end): same count, bit for bit the same floats
            assert len(logits[key]) == len(log1[key])
            assert all(np.array_equal(a, b) for a, b in zip(log1[key], logits[key])), key
        # every output token is accounted for once: kept as forced, kept as otherwise drafted, or chosen
        assert counts.forced + counts.lookup + counts.sampled == plain.sampled
        assert counts.forced + counts.lookup > 0 and counts.steps * parallel < plain.steps, kw
        assert (counts.forced > 0) == kw.get("forced", True), kw
        assert (counts.lookup > 0) == (kw.get("lookup", True) or kw.get("habits", True)), kw
    llm.close()


def test_lookup_drafts_the_rest_of_a_term_from_the_text(tmp_path):
    from mlx_qlora.infer.engines.drafts import LOOKUP_DRAFT, Drafter

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", "Q8_0")
    llm = open_llama(gguf, n_ctx=64, n_threads=1)
    text = llm.tokenize(b"Review: I liked the lobster mango summer roll and the squid.", add_bos=False)
    drafter = Drafter(llm, SMALL, forced=False)
    row = drafter.row(text)
    for t in llm.tokenize(b'{"aspects": [{"term": "Lobster mango', add_bos=False):
        row.accept(t)
    draft, forced = row.propose()
    expected = llm.tokenize(b" summer roll and the squid.", add_bos=False)[:LOOKUP_DRAFT]
    assert not any(forced) and draft == expected
    llm.close()


def test_extract_same_rows_with_and_without_drafts_and_the_split_adds_up(tmp_path):
    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", "Q4_1")
    schema = write_jsonl(tmp_path / "s.json", [SMALL])
    spans = write_jsonl(tmp_path / "t.json", [{**SMALL, "properties": {"aspects": {**SMALL["properties"]["aspects"],
        "items": {**SMALL["properties"]["aspects"]["items"], "properties": {
            "term": {"type": "string", "maxLength": 20}, "sentiment": {"enum": ["positive", "negative"]}}}}}}])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS])
    for sch, extra in [(schema, {}), (spans, {"span_field": "term"})]:   # one grammar, one per row
        got = {}
        for drafts, parallel in (("off", 1), ("schema", 2), ("all", 3)):
            out = tmp_path / f"o{drafts}{len(extra)}.jsonl"
            summary = run(gguf, inp, out, parallel=parallel, schema=str(sch), drafts=drafts, **extra)
            got[drafts] = read(out), summary
        (plain, s0), (drafted, s1) = got["off"], got["all"]
        assert drafted == plain == got["schema"][0] and all("result" in r for r in plain)
        split0, split1 = s0["evaluated_per_row"], s1["evaluated_per_row"]
        assert split0["forced"] == split0["drafted"] == split0["rejected"] == 0
        assert split1["forced"] > 0 and split1["steps"] < split0["steps"]
        # what was kept or chosen is the output; the prompt part is the same work either way
        out_tokens = s0["tokens_out"]
        assert split0["sampled"] == pytest.approx(out_tokens)
        assert split1["forced"] + split1["drafted"] + split1["sampled"] == pytest.approx(out_tokens)
        assert split1["prompt"] == pytest.approx(split0["prompt"])


@pytest.mark.real
def test_smollm2_same_rows_with_and_without_drafts(smollm2_gguf, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r} for r in REVIEWS])
    outs = {}
    for drafts, parallel in (("off", 1), ("all", 4)):
        out = tmp_path / f"o{drafts}.jsonl"
        summary = run(smollm2_gguf, inp, out, parallel=parallel, max_tokens=120, drafts=drafts)
        outs[drafts] = read(out)
    assert outs["all"] == outs["off"] and len(outs["all"]) == len(REVIEWS)
    assert summary["evaluated_per_row"]["forced"] > 0


def test_unknown_drafts_value_is_one_clear_error(tmp_path):
    from mlx_qlora.apps.extract import ExtractConfig
    from mlx_qlora.errors import UserError

    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(UserError, match=r"--drafts 'some': use one of off, schema, all"):
        ExtractConfig(model=None, input=str(inp), output=str(tmp_path / "o.jsonl"), drafts="some")
