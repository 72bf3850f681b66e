"""The embedded SmolLM2 GGUF converted to MLX agrees with real llama.cpp on the same file."""
import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401
import mlx.core as mx

from mlx_qlora.model import model_io
from mlx_qlora.model.llama_load import open_llama

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a land far away, there lived a young princess who loved to read books about",
    "<|im_start|>user\nWhat is the best way to learn a new language?<|im_end|>\n<|im_start|>assistant\n",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of",
    "Machine learning models are trained on large datasets to recognize patterns and make predictions about",
    "To make a cup of tea, first boil the water, then put the tea bag in the cup and",
    "The quick brown fox jumps over the lazy dog. This sentence is famous because it contains",
]
# Digit-heavy table ids are full of near-ties between candidate digits: there the bound is that
# every top-1 disagreement is a near-tie within llama.cpp's own activation-quantization noise.
WIKISQL_PROMPT = ("table: 1-10015132-11\ncolumns: Player, No., Nationality, Position, Years in Toronto, "
                  "School/Club Team\nQ: What position does the player who played for butler cc (ks) play?\n"
                  "A: SELECT Position FROM 1-10015132-11 WHERE School/Club Team = 'Butler CC (KS)'")
TRICKY = ["Hello world", "  leading and  double  spaces ", "digits 1234567 and 3.14159", "tabs\tand\nnewlines\n\n",
          "unicode: naïve café 日本語 🤖", "<|im_start|>user\nhi<|im_end|>", "ALL CAPS SELECT * FROM t;", "don't we'll"]


@pytest.fixture(scope="module")
def llama(smollm2_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    return open_llama(smollm2_gguf, logits_all=True, n_ctx=512, n_threads=2)


@pytest.fixture(scope="module")
def mlx_model(smollm2_mlx):
    # exactly the dequantized blocks in fp32 (the same math as quantized_matmul, 5x faster on CPU)
    return model_io.load(smollm2_mlx, dtype=mx.float32, dequantize=True)


def test_config_is_what_mlx_lm_reads(smollm2_mlx):
    cfg = json.loads((smollm2_mlx / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0  # mlx-lm would silently default to 10000
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert cfg["quantization"]["model.embed_tokens"] == {"bits": 8, "group_size": 32}  # Q8_0 in the file
    from mlx_lm import load

    model, _ = load(str(smollm2_mlx))  # stock mlx-lm loads it too
    assert model.args.rope_theta == 100000.0


def test_tokenizer_matches_llama_cpp(mlx_model, llama):
    _, tok = mlx_model
    for text in TRICKY:
        assert tok.encode(text) == llama.tokenize(text.encode(), add_bos=False, special=True), text


def test_logits_match_llama_cpp(mlx_model, llama):
    """llama.cpp quantizes activations in its dot products, so exact weights in fp32 agree with it
    to ~0.2 mean |Δlogit|; re-quantized weights would agree on only about half of the top-1s."""
    model, tok = mlx_model
    agree = total = 0
    diffs, margins = [], []
    for p in PROMPTS:
        ids = tok.encode(p)
        llama.reset()
        llama.eval(ids)
        ref = np.array(llama.scores[: len(ids)])
        ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        total += len(ids)
        diffs.append(np.abs(ref - ours).mean())
        top2 = np.sort(ref[ref.argmax(-1) != ours.argmax(-1)], axis=-1)[:, -2:]
        margins += list(top2[:, 1] - top2[:, 0])
    top1, mean_diff = agree / total, float(np.mean(diffs))
    print(f"top-1 agreement {top1:.3%}, mean |dlogit| {mean_diff:.3f} over {total} positions; "
          f"llama.cpp's own top-2 margin where we differ: {[round(float(m), 3) for m in margins]}")
    # llama-cpp-python 0.3.36 flips 2 of 142 (margins 0.003 and 0.001 logits), earlier builds 1: a
    # count alone measures llama.cpp's tie-breaking; what must hold is that every top-1 we differ
    # on is one llama.cpp itself can barely tell apart (< 0.25 logits, as on WikiSQL rows below).
    assert mean_diff <= 0.25 and top1 >= 0.98
    assert all(m < 0.25 for m in margins), margins


def test_disagreements_on_digit_heavy_text_are_near_ties(mlx_model, llama):
    model, tok = mlx_model
    ids = tok.encode(WIKISQL_PROMPT)
    llama.reset()
    llama.eval(ids)
    ref = np.array(llama.scores[: len(ids)])
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(ref - ours).mean() <= 0.25
    for i in np.where(ref.argmax(-1) != ours.argmax(-1))[0]:
        top2 = np.sort(ref[i])[-2:]
        assert top2[1] - top2[0] < 0.5, (i, top2)  # llama.cpp itself barely prefers its pick
