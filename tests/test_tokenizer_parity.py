"""llama.cpp tokenizes exported GGUFs exactly like the Hugging Face tokenizer: a byte-level BPE
(tiny, SmolLM2 with its digit-splitting pre-tokenizer) and a SentencePiece model built here."""
from __future__ import annotations

import json

import pytest

from lora_fixtures import converted, llama

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")

TRICKY = [
    "Hello world", " leading space", "double  space and   triple", "trailing space ", "tabs\tand\nnewlines\n\n",
    "Digits 12345 and 3.14159 and 1,000,000", "unicode: café naïve Ελληνικά 日本語 🙂👍", "MiXeD CaSe WORDS",
    "punctuation!?... (brackets) [x] {y} 'quotes' \"double\"", "SELECT name FROM users WHERE id = 42;",
    "it's we're they'll I'd", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b",
    "   ", "x", "emoji🙂inside", "ünïcödé at start",
]


def _export(model_dir, out):
    from mlx_qlora.export import ExportConfig, run_export

    run_export(ExportConfig(model=str(model_dir), out=str(out), type="f16", modelfile=False))


def _compare(model_dir, gguf_path, texts):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    llm = llama(gguf_path, vocab_only=True)
    for text in texts:
        want = hf.encode(text)  # with the tokenizer's own BOS/EOS rule, which the GGUF carries
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == want, (text, got, want)


def test_bpe_tiny(tmp_path_factory, tiny_hf_llama, tmp_path):
    d = converted(tmp_path_factory, tiny_hf_llama, "tok_llama", quantize=False)
    _export(d, tmp_path / "t.gguf")
    _compare(d, tmp_path / "t.gguf", TRICKY)


@pytest.mark.real
def test_bpe_smollm2(tmp_path_factory, tmp_path):
    d = converted(tmp_path_factory, None, "tok_smol")
    _export(d, tmp_path / "s.gguf")
    _compare(d, tmp_path / "s.gguf", TRICKY)


def _sentencepiece_llama(tmp_path):
    """A tiny llama whose tokenizer is a SentencePiece BPE model trained here, configured like
    Llama's (byte fallback, dummy prefix, spaces kept: llama.cpp's SPM tokenizer assumes these)."""
    import sentencepiece as spm
    import tiny
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    lines = ["The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE id = 42;",
             "Once upon a time there was a robot who liked numbers like 12345 and 3.14.",
             "Hello world, hello again; it's a small world after all.", "café naïve résumé Ελληνικά"] * 40
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, minloglevel=2,
                                   model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    hf_dir = tmp_path / "hf"
    tiny.write_hf_dir(hf_dir, arch="llama")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / f).unlink()
    import shutil

    shutil.copy(tmp_path / "sp.model", hf_dir / "tokenizer.model")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    # transformers 5 rebuilds the fast tokenizer with a Metaspace that drops a leading space
    # (" a" -> "▁a"); Llama-2's own tokenizer.json (and sentencepiece, and llama.cpp) give
    # "▁▁a". Save the Llama-2 layout: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer.
    state = json.loads(tok.backend_tokenizer.to_str())
    state["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    state["pre_tokenizer"] = None
    (hf_dir / "tokenizer.json").write_text(json.dumps(state))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    assert tok.encode(" leading  spaces") == [1] + sp.encode(" leading  spaces")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    w = load_file(str(hf_dir / "model.safetensors"))
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][: len(tok)]
    save_file(w, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return hf_dir


def test_sentencepiece(tmp_path):
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    hf_dir = _sentencepiece_llama(tmp_path)
    d = tmp_path / "mlx"
    run_convert(ConvertConfig(source=str(hf_dir), out_dir=str(d), quantize=False))
    _export(d, tmp_path / "sp.gguf")
    import gguf

    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "sp.gguf")).fields.items()}
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == 400
    _compare(d, tmp_path / "sp.gguf", [t for t in TRICKY if "<|" not in t])
