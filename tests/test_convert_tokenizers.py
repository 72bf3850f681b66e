"""GGUF tokenizers rebuilt as Hugging Face tokenizers tokenize exactly like llama.cpp (and, for
SentencePiece, like the sentencepiece library itself)."""
import pytest

import tiny
from mlx_qlora.model import model_io
from mlx_qlora.model.convert import ConvertConfig, run_convert

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
    llm = llama_cpp.Llama(str(g), vocab_only=True, verbose=False)
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
    llm = llama_cpp.Llama(str(g), vocab_only=True, verbose=False)
    for text in TRICKY + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
