"""Rows' prompts batched into the decoder's steps (BatchDecoder ``prefill``): several rows' prompts and
the generating rows' tokens in one ``llama_decode`` call, every logit of every row bit for bit the
one a row sees alone (``--parallel 1``), on the tiny model and the real SmolLM2 (Q4_1 as shipped,
Q8_0 rewritten by llama.cpp's quantizer)."""
from __future__ import annotations

import pytest

import tiny
from test_extract import REVIEWS, SMALL

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

# a review long enough that its prompt needs two pieces of at most PROMPT_CHUNK tokens; first, so that
# its later pieces run beside the other rows' first generated tokens
LONG = " ".join(REVIEWS) + " The bread came late and cold, and nobody asked whether we wanted more water."


def decode(llm, prompts, prefix, parallel, prefill, max_tokens=24, schema=SMALL, slot_tokens=200, threads=1,
           stop_after=None):
    """({row: tokens}, {row: logits at each pick}, [the (token, pos, seq, logits) items of each call])."""
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder, Job, schema_to_gbnf

    seen, calls = {}, []

    class Recording(BatchDecoder):
        def _pick(self, slot, logits):
            seen.setdefault(slot.job.key, []).append(logits.copy())
            return super()._pick(slot, logits)

        def _run(self, items):
            calls.append(list(items))
            return super()._run(items)

        def _take(self, slot, tok):   # stop_after: rows ending at other lengths (a schedule check)
            if stop_after and len(slot.job.tokens) + 1 >= stop_after[slot.job.key]:
                return True
            return super()._take(slot, tok)

    dec = Recording(llm, schema_to_gbnf(schema), prefix, parallel=parallel, max_tokens=max_tokens, slot_tokens=slot_tokens, n_threads=threads,
                    prefill=prefill)
    try:
        done = {j.key: j.tokens for j in dec.run([Job(i, p) for i, p in enumerate(prompts)])}
    finally:
        dec.close()
    return done, seen, calls[1:] if prefix else calls   # the first call is the shared prefix


def same_logits(ref, got) -> None:
    import numpy as np

    for key in ref:
        assert len(got[key]) == len(ref[key]), key
        assert all(np.array_equal(a, b) for a, b in zip(ref[key], got[key])), key


def check_batching(llm, texts: list[str], configs, max_tokens: int = 24) -> None:
    from mlx_qlora.infer.engines.llamacpp_batch import PROMPT_CHUNK

    prefix = llm.tokenize(b"Reviews follow. Extract the aspects of each one.", add_bos=True)
    prompts = [prefix + llm.tokenize(t.encode(), add_bos=False) for t in texts]
    assert max(len(p) - len(prefix) for p in prompts) > PROMPT_CHUNK      # one prompt is cut in pieces
    tok1, log1, calls1 = decode(llm, prompts, prefix, 1, "own", max_tokens)
    assert sum(map(len, tok1.values())) > 2 * len(prompts)
    for parallel, prefill in configs:
        tok, logits, calls = decode(llm, prompts, prefix, parallel, prefill, max_tokens)
        assert tok == tok1, (parallel, prefill)
        same_logits(log1, logits)
        fed = [{} for _ in calls]      # per call: seq -> tokens of that row in the call
        for per, items in zip(fed, calls):
            for _, _, seq, _ in items:
                per[seq] = per.get(seq, 0) + 1
        assert max(n for per in fed for n in per.values()) <= PROMPT_CHUNK   # a prompt piece, or a generating row's token
        if parallel > 1:   # the schedule asked for: several rows' prompts in one call, and prompts mixed into
            #                 the steps of generating rows (a row's token of a step: 1 in its call)
            if prefill != "own":
                assert any(sum(n > 1 for n in per.values()) >= 2 for per in fed), (parallel, prefill)
                assert any(1 in per.values() and max(per.values()) > 1 for per in fed), (parallel, prefill)
            assert len(calls) < len(calls1)
        if prefill == "own":    # a row whose prompt ran alone is in the very next step (no gap in its ids),
            #                     rows ending at scattered times
            _, _, calls = decode(llm, prompts, prefix, parallel, prefill, max_tokens,
                                 stop_after={i: 3 + 5 * (i % 4) for i in range(len(prompts))})
            prompt_calls = [i for i, items in enumerate(calls) if len({q for _, _, q, _ in items}) == 1
                            and len(items) > 1 and items[-1][3]]
            later = [i for i in prompt_calls if i > 6]
            assert later, "no row started while others were generating"
            for i in prompt_calls:
                seq = calls[i][0][2]
                step = next(c for k, c in enumerate(calls) if k > i and k not in prompt_calls)
                assert seq in {q for _, _, q, _ in step}, (parallel, i)
        if prefill == "even":   # every row filling its prompt feeds the same count in a call
            assert all(len({n for n in per.values() if n > 1}) <= 1 for per in fed)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_prompts_batched_into_steps_give_every_logit_of_one_row_at_a_time(qtype, tmp_path):
    from mlx_qlora.model.llama_load import open_llama

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", qtype)
    llm = open_llama(gguf, n_ctx=64, n_threads=1)
    check_batching(llm, [LONG] + REVIEWS, [(4, "even"), (3, "wave"), (8, "even"), (8, "wave"), (1, "even"), (4, "own")])
    llm.close()


@pytest.mark.real
@pytest.mark.parametrize("kind", ["as shipped (Q4_1)", "q8_0"])
def test_smollm2_prompts_batched_into_steps_give_every_logit(kind, smollm2_gguf, tmp_path):
    import sys
    from pathlib import Path

    from mlx_qlora.model.llama_load import open_llama

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.extract import requantize

    path = str(smollm2_gguf) if kind.startswith("as") else requantize(str(smollm2_gguf), kind, tmp_path)
    llm = open_llama(path, n_ctx=64, n_threads=2)
    check_batching(llm, [LONG] + REVIEWS, [(8, "even"), (5, "wave")], max_tokens=16)
    llm.close()


def test_unknown_prefill_is_one_clear_error(tmp_path):
    from mlx_qlora.errors import UserError
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder
    from mlx_qlora.model.llama_load import open_llama

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", "Q8_0")
    llm = open_llama(gguf, n_ctx=64, n_threads=1)
    with pytest.raises(UserError, match=r"prefill 'later': use one of own, even, wave"):
        BatchDecoder(llm, 'root ::= "a"', [], parallel=2, prefill="later")
    llm.close()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_rows_past_256_cells_give_every_logit_of_one_row_at_a_time(qtype, tmp_path):
    """Past 256 positions llama.cpp's KV window is 512 cells, where one token of one row alone would
    take ggml's split-KV attention (every output token of --parallel 1 differed from --parallel 4)."""
    from mlx_qlora.infer.engines.llamacpp_batch import SPLIT_KV_POS
    from mlx_qlora.model.llama_load import open_llama

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", qtype)
    llm = open_llama(gguf, n_ctx=64, n_threads=2)
    prefix = llm.tokenize(b"Reviews follow. Extract the aspects of each one.", add_bos=True)
    text = " ".join(REVIEWS) * 4
    prompts = [prefix + llm.tokenize(text[:290 + 23 * i].encode(), add_bos=False) for i in range(4)]
    assert min(map(len, prompts)) > SPLIT_KV_POS and len(set(map(len, prompts))) == 4
    tok1, log1, _ = decode(llm, prompts, prefix, 1, "own", max_tokens=12, slot_tokens=480, threads=2)
    for parallel, prefill in [(2, "even"), (3, "own")]:
        tok, logits, _ = decode(llm, prompts, prefix, parallel, prefill, max_tokens=12, slot_tokens=480, threads=2)
        assert tok == tok1
        same_logits(log1, logits)
    llm.close()


def test_extract_rows_are_the_same_with_every_prefill_and_a_bad_one_is_refused(tmp_path):
    from mlx_qlora.apps.extract import ExtractConfig
    from mlx_qlora.errors import UserError
    from test_extract import read, run, write_jsonl

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", "Q4_1")
    schema = write_jsonl(tmp_path / "s.json", [SMALL])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in [LONG] + REVIEWS])
    got = {}
    for prefill, parallel in (("own", 1), ("even", 3), ("wave", 4)):
        out = tmp_path / f"{prefill}.jsonl"
        summary = run(gguf, inp, out, parallel=parallel, schema=str(schema), prefill=prefill)
        got[prefill] = read(out)
        assert summary["rows"] == len(REVIEWS) + 1
    assert got["even"] == got["own"] == got["wave"] and all("result" in r for r in got["own"])
    with pytest.raises(UserError, match=r"prefill 'all': use one of own, even, wave"):
        ExtractConfig(model=None, input=str(inp), output=str(tmp_path / "o.jsonl"), prefill="all")


def test_f16_weights_give_every_logit_of_one_row_at_a_time(tmp_path):
    """F16 matmuls sum one token another way than several (llamafile's tinyBLAS from 2 on): no
    micro-batch of one token or one output of several, so every logit matches (it did not before)."""
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder
    from mlx_qlora.model.llama_load import open_llama

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=3), tmp_path / "m.gguf", "F16")
    llm = open_llama(gguf, n_ctx=64, n_threads=1)
    prefix = llm.tokenize(b"Reviews follow. Extract the aspects of each one.", add_bos=True)
    prompts = [prefix + llm.tokenize(t.encode(), add_bos=False) for t in [LONG] + REVIEWS]
    tok1, log1, _ = decode(llm, prompts, prefix, 1, "own")
    for parallel in (2, 4, 8):
        tok, logits, _ = decode(llm, prompts, prefix, parallel, "own")
        assert tok == tok1
        same_logits(log1, logits)
    assert BatchDecoder(llm, 'root ::= "a"', [], parallel=2, prefill="wave").prefill == "own"   # F16: own only
    llm.close()
