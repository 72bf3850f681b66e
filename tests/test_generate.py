"""KV-cached generation equals the model's greedy continuation computed directly (argmax over a
full forward pass, no cache), across prefix reuse, adapters and the CPU decode rewrite."""
from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.model.llama_load import open_llama
from mlx_qlora.infer.generate import Detokenizer, KVSession, SamplingConfig, generate_tokens
from test_adapters import make_adapter, write_untied_llama


def direct_greedy(model, prompt: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    """The reference: recompute the whole sequence each step and take the argmax."""
    ids, out = list(prompt), []
    for _ in range(n):
        tok = int(mx.argmax(model(mx.array(ids)[None])[0, -1]).item())
        if tok in stop:
            break
        out.append(tok)
        ids.append(tok)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_untied_llama(tmp_path_factory.mktemp("untied_llama"))


@pytest.fixture(params=["llama_dir", "tiny_hf_qwen2"])
def tiny_model(request):
    from mlx_qlora.model.model_io import load

    d = request.getfixturevalue(request.param)
    model, tok = load(d)
    return d, model, tok


def test_greedy_equals_direct_argmax(tiny_model):
    _, model, _ = tiny_model
    prompt = [3, 77, 120, 45, 9, 200, 31]
    want = direct_greedy(model, prompt, 24)
    session = KVSession(model)
    got = list(generate_tokens(session, prompt, SamplingConfig(max_tokens=24)))
    assert got == want
    assert len(set(want)) > 3  # a degenerate model would make the comparison weak
    # the session holds exactly prompt + generated (minus the last, never fed)
    assert session.tokens == prompt + got[:-1]


def test_prefix_reuse_gives_same_tokens(tiny_model):
    _, model, _ = tiny_model
    session = KVSession(model)
    turn1 = [3, 77, 120, 45, 9]
    out1 = list(generate_tokens(session, turn1, SamplingConfig(max_tokens=8)))
    turn2 = turn1 + out1 + [12, 13, 14]
    info = {}
    out2 = list(generate_tokens(session, turn2, SamplingConfig(max_tokens=12), info=info))
    assert info["reused"] == len(turn1) + len(out1) - 1  # everything the cache held
    assert out2 == direct_greedy(model, turn2, 12)
    # a prompt that diverges early rewinds the cache and still matches
    turn3 = turn1[:2] + [99, 98]
    info = {}
    out3 = list(generate_tokens(session, turn3, SamplingConfig(max_tokens=10), info=info))
    assert info["reused"] == 2
    assert out3 == direct_greedy(model, turn3, 10)


def test_chunked_prefill(tiny_model, monkeypatch):
    import mlx_qlora.infer.generate as g

    _, model, _ = tiny_model
    monkeypatch.setattr(g, "PREFILL_STEP", 4)  # 11 prompt tokens -> chunks of 4, 4, 3
    prompt = [3, 77, 120, 45, 9, 200, 31, 8, 8, 150, 2]
    assert list(generate_tokens(KVSession(model), prompt, SamplingConfig(max_tokens=10))) == \
        direct_greedy(model, prompt, 10)


def test_stop_ids_and_max_tokens(tiny_model):
    _, model, _ = tiny_model
    prompt = [3, 77, 120, 45]
    ref = direct_greedy(model, prompt, 10)
    info = {}
    got = list(generate_tokens(KVSession(model), prompt, SamplingConfig(max_tokens=10), {ref[4]}, info))
    assert got == ref[:ref.index(ref[4])] and info["finish_reason"] == "stop"
    info = {}
    got = list(generate_tokens(KVSession(model), prompt, SamplingConfig(max_tokens=3), info=info))
    assert got == ref[:3] and info["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(tiny_model):
    _, model, _ = tiny_model
    prompt = [3, 77, 120, 45]

    def sample(seed, **kw):
        cfg = SamplingConfig(temperature=1.5, seed=seed, max_tokens=20, **kw)
        return list(generate_tokens(KVSession(model), prompt, cfg))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == direct_greedy(model, prompt, 20)  # top-1 sampling is greedy
    assert sample(4, top_p=0.5, min_p=0.1, repetition_penalty=1.3) == sample(4, top_p=0.5, min_p=0.1,
                                                                             repetition_penalty=1.3)
    with pytest.raises(UserError, match="top-p"):
        SamplingConfig(top_p=0).validate()


def test_detokenizer_streams_exact_text(tiny_hf_llama):
    from mlx_qlora.model.model_io import load

    _, tok = load(tiny_hf_llama)
    text = "SELECT naïve café FROM t WHERE x = '🙂 ok' 日本"
    ids = tok._tokenizer.encode(text, add_special_tokens=False)
    d = Detokenizer(lambda x: tok._tokenizer.decode(x))
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_engine_matches_direct_greedy_with_adapters_and_cpu_rewrite(llama_dir, tmp_path):
    """The chat engine (CPU rewrite on, adapters loaded) vs reference models computed directly."""
    from mlx_qlora.infer.adapters import parse_adapter_specs
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine
    from mlx_qlora.model.model_io import load
    from test_adapters import fused_model

    a = make_adapter(llama_dir, tmp_path / "a", seed=5)
    eng = MLXEngine(llama_dir, parse_adapter_specs([f"a={a}"]), cpu_fast=True)
    plain, tok = load(llama_dir)
    msgs = [{"role": "user", "content": "the cat sat on"}]
    prompt = eng.chat_prompt(msgs)
    assert prompt == tok._tokenizer.encode(tok.apply_chat_template(msgs, tokenize=False,
                                                                    add_generation_prompt=True),
                                           add_special_tokens=False)
    cfg = SamplingConfig(max_tokens=16)
    stop = eng.stop_ids
    texts = []
    for name, ref_model in [(None, plain), ("a", fused_model(llama_dir, a)), (None, plain)]:
        eng.set_adapter(name)
        texts.append(eng.generate(prompt, cfg))
        want = direct_greedy(ref_model, prompt, 16, stop)
        assert texts[-1] == tok._tokenizer.decode(want, skip_special_tokens=True), name
        assert eng.stats.generated_tokens == len(want)
    assert texts[0] == texts[2] != texts[1]
    # second identical call reuses the whole prompt from the cache
    eng.generate(prompt, cfg)
    assert eng.stats.reused_tokens == len(prompt) - 1


def test_stop_strings_are_cut(llama_dir):
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine

    eng = MLXEngine(llama_dir, cpu_fast=False)
    prompt = eng.encode("the cat")
    full = eng.generate(prompt, SamplingConfig(max_tokens=30))
    assert len(full) > 6
    stop = full[3:6]
    cut = eng.generate(prompt, SamplingConfig(max_tokens=30), stop=(stop,))
    assert cut == full[:full.index(stop)] and eng.stats.finish_reason == "stop"


@pytest.mark.cpu_math
@pytest.mark.parametrize("which", ["tiny_hf_llama", "tiny_hf_qwen2"])  # tied head, biases
def test_cpu_rewrite_keeps_logits(which, request):
    import mlx.nn as nn

    from mlx_qlora.infer.engines.cpu_decode import prepare
    from mlx_qlora.model.model_io import load

    model, _ = load(request.getfixturevalue(which))
    nn.quantize(model, group_size=32, bits=4)  # the rewrite must dequantize exactly
    ids = mx.array([[3, 77, 120, 45, 9]])
    before = model(ids)
    prepare(model)
    np.testing.assert_allclose(np.array(model(ids)), np.array(before), rtol=1e-3, atol=1e-3)
    # and the one-row (matrix-vector) path agrees with the many-row one
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(ids[:, :4], cache=cache)
    np.testing.assert_allclose(np.array(model(ids[:, 4:], cache=cache)[0, -1]), np.array(before[0, -1]),
                               rtol=1e-3, atol=1e-3)


# --- the llama.cpp engine ------------------------------------------------------------------------
def _llama_direct_greedy(gguf, prompt, n, stop, lora=None):
    """Reference on llama.cpp's own numbers: re-evaluate the whole sequence, argmax the last row."""
    import ctypes

    import llama_cpp

    llm = open_llama(gguf, n_ctx=512, logits_all=True, n_threads=1, n_threads_batch=1)
    if lora is not None:
        h = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode())
        llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(h), 1,
                                          (ctypes.c_float * 1)(1.0))
    ids, out = list(prompt), []
    for _ in range(n):
        llm.reset()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[len(ids) - 1]))
        if tok in stop:
            break
        out.append(tok)
        ids.append(tok)
    llm.close()
    return out


@pytest.fixture(scope="module")
def gguf_model(llama_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    import tiny

    d = tmp_path_factory.mktemp("gguf")
    tiny.write_gguf(llama_dir, d / "model.gguf")
    return d / "model.gguf", make_adapter(llama_dir, d / "sql", seed=9)


@pytest.mark.llamacpp
def test_llamacpp_engine_greedy_equals_direct_and_adapters_match_mlx(llama_dir, gguf_model, tmp_path):
    import mlx.core as mx

    from mlx_qlora.infer.adapters import parse_adapter_specs
    from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine, write_lora_gguf
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine

    gguf, sql = gguf_model
    specs = parse_adapter_specs([f"sql={sql}"])
    eng = LlamaCppEngine(gguf, specs, n_ctx=512, n_threads=1)
    ref = MLXEngine(llama_dir, specs, cpu_fast=False)
    msgs = [{"role": "user", "content": "the cat sat on"}]
    prompt = eng.chat_prompt(msgs)
    assert prompt == ref.chat_prompt(msgs)  # same template, same tokenizer
    lora = write_lora_gguf(specs[0], eng.llm.metadata, tmp_path / "sql.gguf")
    cfg = SamplingConfig(max_tokens=12)
    texts = {}
    for name in [None, "sql", None]:
        eng.set_adapter(name)
        texts[name] = eng.generate(prompt, cfg)
        want = _llama_direct_greedy(gguf, prompt, 12, eng.stop_ids, lora if name else None)
        assert texts[name] == eng.llm.detokenize(want).decode("utf-8", errors="replace"), name
    assert texts[None] != texts["sql"]
    # the converted LoRA is the same function as the MLX adapter: llama.cpp's logits (f16 KV
    # cache) sit far closer to the MLX adapter's than the adapter is to the base
    ids = prompt + eng.encode(" SELECT a FROM b")
    got = {}
    for name in [None, "sql"]:
        ref.set_adapter(name)
        got[name] = np.array(ref.model(mx.array(ids)[None])[0])
    lc = _llama_logits(gguf, ids, lora)
    assert np.abs(lc - got["sql"]).max() < 0.1 * np.abs(got["sql"] - got[None]).max()
    eng.close()


def _llama_logits(gguf, ids, lora):
    import ctypes

    import llama_cpp

    llm = open_llama(gguf, n_ctx=512, logits_all=True, n_threads=1, n_threads_batch=1)
    h = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode())
    llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(h), 1,
                                      (ctypes.c_float * 1)(1.0))
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)])
    llm.close()
    return out


@pytest.mark.llamacpp
def test_llamacpp_sampling_and_prefix_reuse(gguf_model):
    from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(gguf_model[0], n_ctx=512, n_threads=1)
    prompt = eng.encode("the cat sat on the mat")

    def sample(seed):
        return eng.generate(prompt, SamplingConfig(temperature=1.5, top_k=40, top_p=0.95, seed=seed, max_tokens=20))

    assert sample(1) == sample(1) != sample(2)
    greedy = eng.generate(prompt, SamplingConfig(max_tokens=10))
    longer = prompt + eng.encode(greedy)[:3]
    eng.generate(longer, SamplingConfig(max_tokens=4))
    assert eng.stats.reused_tokens >= len(prompt)  # the cached prompt was not recomputed
    eng.close()


@pytest.mark.llamacpp
def test_engine_choice(llama_dir, gguf_model, tmp_path):
    from mlx_qlora.infer.engines import EngineConfig, choose, load_engine, resolve

    gguf, _ = gguf_model
    cfg = EngineConfig(model=str(llama_dir), gguf=str(gguf))
    model_dir, found = resolve(cfg)
    assert (model_dir, found) == (llama_dir, gguf)
    assert choose(cfg, model_dir, found) == "llama.cpp"  # CPU + GGUF at hand
    assert choose(cfg, model_dir, None) == "mlx"
    assert resolve(EngineConfig(model=str(gguf)))[0] is None
    with pytest.raises(UserError, match="needs an MLX model directory"):
        load_engine(EngineConfig(model=str(gguf), engine="mlx"))
    # a directory with no GGUF: asking for llama.cpp builds a lossless one (tests/test_engine_default.py)
    # where the weights allow it, else names why not and the ways to get one
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    rounded = tmp_path / "q4"   # fp32 quantization scales: no GGUF block holds them exactly
    run_convert(ConvertConfig(source=str(llama_dir), out_dir=str(rounded)))
    with pytest.raises(UserError, match="needs a GGUF .* none can be made exactly .*--gguf FILE"):
        load_engine(EngineConfig(model=str(rounded), engine="llama.cpp"))


@pytest.mark.real
@pytest.mark.llamacpp
def test_embedded_smollm2_on_llamacpp_greedy_equals_direct():
    pytest.importorskip("llama_cpp")
    from mlx_qlora.model.embedded import find_embedded_gguf
    from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine

    gguf = find_embedded_gguf()
    if gguf is None:
        pytest.skip("embedded SmolLM2 not installed")
    eng = LlamaCppEngine(gguf, n_ctx=512, n_threads=1)
    prompt = eng.chat_prompt([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    text = eng.generate(prompt, SamplingConfig(max_tokens=8))
    want = _llama_direct_greedy(gguf, prompt, 8, eng.stop_ids)
    assert text == eng.llm.detokenize(want).decode() and "Paris" in text
    eng.close()
