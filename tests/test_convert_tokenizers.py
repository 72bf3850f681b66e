"""GGUF tokenizers rebuilt as Hugging Face tokenizers tokenize exactly like llama.cpp (and, for
SentencePiece, like the sentencepiece library itself)."""
import pytest

import tiny
from mlx_qlora.model import model_io
from mlx_qlora.model.convert import ConvertConfig, run_convert
from mlx_qlora.model.llama_load import open_llama

TRICKY = ["Hello world", "  leading and  double  spaces", "digits 1234567 and 3.14159", "tabs\tand\nnewlines\n",
          "unicode: naïve café 日本語 🤖 ✓", "SELECT name FROM users WHERE age > 30;", "don't we'll", ""]


@pytest.mark.llamacpp
def test_sentencepiece_gguf_tokenizer_matches_llama_cpp_and_sentencepiece(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import sentencepiece as spm

    sp_model = tiny.train_sentencepiece(tmp_path / "sp")
    g = tiny.write_sp_gguf(tmp_path / "sp.gguf", sp_model)
    run_convert(ConvertConfig(source=str(g), out_dir=str(tmp_path / "o")))
    _, tok = model_io.load(tmp_path / "o")
    llm = open_llama(g, vocab_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in TRICKY:
        ours = tok.encode(text)  # adds BOS, as the GGUF's add_bos_token says
        assert ours == llm.tokenize(text.encode(), add_bos=True, special=False), text
        assert ours == [1] + sp.encode(text), text
        assert tok.decode(ours, skip_special_tokens=True) == text, text


@pytest.mark.llamacpp
def test_bpe_gguf_tokenizer_matches_llama_cpp(tmp_path, tiny_hf_llama):
    llama_cpp = pytest.importorskip("llama_cpp")
    g = tiny.write_gguf(tiny_hf_llama, tmp_path / "m.gguf", "F32")
    run_convert(ConvertConfig(source=str(g), out_dir=str(tmp_path / "o")))
    _, tok = model_io.load(tmp_path / "o")
    llm = open_llama(g, vocab_only=True)
    for text in TRICKY + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text


def test_sentencepiece_merges_rank_by_joined_score():
    from mlx_qlora.model.vocab import spm_merges

    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -2.0, -1.0, -3.0]
    # "bc" scores higher than "ab", so it merges first; "abc" has two splits, both kept, ranked last
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_unknown_vocabulary_kind_is_a_user_error():
    from mlx_qlora.errors import UserError
    from mlx_qlora.model.vocab import tokenizer_from_gguf

    with pytest.raises(UserError, match="tokenizer.ggml.model is 'rwkv'"):
        tokenizer_from_gguf({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.model": "rwkv"}, "rwkv")


def test_no_private_transformers_modules():
    import inspect

    from mlx_qlora.model import vocab

    assert "transformers.integrations" not in inspect.getsource(vocab)
