"""Hugging Face tokenizer -> llama.cpp tokenizer metadata (``tokenizer.ggml.*``).

Two vocabularies llama.cpp understands:

* GPT-2 style byte-level BPE (``model = "gpt2"``): tokens in id order, merges ``"a b"``, and a
  ``pre`` name that selects llama.cpp's pre-tokenizer split (its regexes are compiled in, so
  the name must be one it knows; the table below maps HF pre-tokenizers to those names).
* SentencePiece (``model = "llama"``): tokens, scores and token types read from
  ``tokenizer.model`` with the sentencepiece library, as llama.cpp's own converter does.

Special ids, add-bos/eos and the chat template are read from the tokenizer's behaviour (encode a
word and look), not from config guesses. Tests check llama.cpp then tokenizes like HF does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# llama.cpp token types (llama_token_type): gguf-py's TokenType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# HF pre-tokenizer regex (a Split step) -> llama.cpp `pre` name with the same regex.
PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def _bytelevel(step: dict) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def pre_name(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for an HF ``pre_tokenizer`` JSON, or None if unknown."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if len(steps) == 1 and _bytelevel(steps[0]):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and _bytelevel(steps[1]):
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds[:1] == ["Split"] and kinds[1:] == ["ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return PRE_BY_REGEX.get(regex)
    return None


@dataclass
class GGUFVocab:
    model: str                      # "gpt2" | "llama"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # bos/eos/unk/pad -> token id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)    # differences llama.cpp cannot reproduce

    def write(self, w) -> None:
        """Add the ``tokenizer.*`` keys to a gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for name, tid in self.special_ids.items():
            getattr(w, f"add_{name}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def vocab_from_model_dir(model_dir: Path, config: dict) -> GGUFVocab:
    """Read the tokenizer saved beside an MLX model and describe it for llama.cpp."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__}: {e}); "
                        "the model directory needs tokenizer.json or tokenizer.model") from None
    state = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    n_vocab = max(int(config.get("vocab_size", 0)), len(tok))
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer")) or \
        (state.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level and state.get("model", {}).get("type") == "BPE":
        v = _bpe_vocab(tok, state, n_vocab)
    elif (model_dir / "tokenizer.model").exists():
        v = _sentencepiece_vocab(tok, model_dir / "tokenizer.model", n_vocab)
    else:
        raise UserError(f"the tokenizer in {model_dir} is neither byte-level BPE (tokenizer.json) nor "
                        "SentencePiece (tokenizer.model); llama.cpp export supports only those two")
    v.special_ids = _special_ids(tok, config)
    v.add_bos, v.add_eos = _adds_bos_eos(tok)
    v.chat_template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return v


def _added(tok) -> dict[int, bool]:
    """Added tokens: id -> special?"""
    return {int(i): bool(t.special) for i, t in tok.added_tokens_decoder.items()}


def _bpe_vocab(tok, state: dict, n_vocab: int) -> GGUFVocab:
    pre = pre_name(state.get("pre_tokenizer"))
    if pre is None:
        raise UserError(f"the tokenizer's pre-tokenizer {json.dumps(state.get('pre_tokenizer'))[:120]} has no "
                        "llama.cpp equivalent known to mlx_qlora; llama.cpp would split text differently. "
                        f"Known: gpt-2, smollm, {', '.join(PRE_BY_REGEX.values())}")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = _added(tok)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # padded embedding rows: llama.cpp needs one token per row
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append((CONTROL if added[i] else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre)


def _sentencepiece_vocab(tok, path: Path, n_vocab: int) -> GGUFVocab:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = _added(tok)
    for i in range(sp.vocab_size(), n_vocab):  # HF added tokens after the SentencePiece vocab
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        scores.append(-1000.0)
        types.append((CONTROL if added[i] else USER_DEFINED) if i in added else UNUSED)
    # SentencePiece's dummy prefix ("hello" -> "▁hello"), read from behaviour not from the proto
    prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    v = GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=prefix)
    if sp.encode("a  b") == sp.encode("a b"):  # normalizer collapses spaces; llama.cpp's SPM never does
        v.warnings.append("warning: this SentencePiece model removes extra whitespace, llama.cpp does not; "
                          "texts with leading or repeated spaces will tokenize differently")
    return v


def _special_ids(tok, config: dict) -> dict[str, int]:
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    if ids["eos"] is None and config.get("eos_token_id") is not None:
        eos = config["eos_token_id"]
        ids["eos"] = int(eos[0] if isinstance(eos, list) else eos)
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds_bos_eos(tok) -> tuple[bool, bool]:
    """Does the tokenizer add BOS / EOS on its own? Encode a word with and without specials."""
    plain = tok.encode("hello", add_special_tokens=False)
    full = tok.encode("hello", add_special_tokens=True)
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    return bool(bos), bool(eos)
