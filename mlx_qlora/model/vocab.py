"""GGUF tokenizer metadata -> a Hugging Face fast tokenizer (tokenizer.json + config).

Built only from public APIs: a ``tokenizers.models.BPE`` from llama.cpp's vocabulary and merges,
the normalizer / pre-tokenizer / decoder that reproduce llama.cpp's split for the file's
``tokenizer.ggml.model`` and ``tokenizer.ggml.pre``, the control and user-defined tokens as added
tokens, then ``transformers.PreTrainedTokenizerFast`` around it. The result must tokenize exactly
like llama.cpp does (tests/test_convert_tokenizers.py and tests/test_tokenizer_parity.py check it).

Two vocabulary kinds are supported: ``gpt2`` (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM...)
and ``llama`` (SentencePiece BPE with byte fallback: Llama 2, Mistral...).
"""
from __future__ import annotations

from ..errors import UserError

# llama.cpp token types (gguf TokenType): the ones that become added tokens.
_CONTROL, _USER_DEFINED = 3, 4

# The split regexes llama.cpp applies per `tokenizer.ggml.pre` (its llama-vocab.cpp tables), for the
# pre-tokenizer names whose split is not GPT-2's. Unlisted names (default, gpt-2, ...) get GPT-2's.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
               "dbrx": _LLAMA3, "falcon3": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
# Names whose split is GPT-2's regex after every digit is cut on its own (SmolLM).
DIGITS_FIRST = {"smollm"}

_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: it merges the adjacent pair whose joined piece scores
    highest. The equivalent ranked list: every split of every piece into two vocabulary pieces,
    best joined score first (ties by the pieces' ids, so the order is deterministic)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-float(score), ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level(meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in SPLIT_REGEX)
    if pre in SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"), byte_level])
    elif pre in DIGITS_FIRST:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict):
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise UserError("cannot rebuild the GGUF tokenizer: a SentencePiece vocabulary without "
                        "tokenizer.ggml.scores; convert from the original Hugging Face directory instead")
    merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
              if "tokenizer.ggml.merges" in meta else spm_merges(tokens, scores))
    unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    # SentencePiece (and llama.cpp) turn every space into "▁" and add one "▁" in front; no split.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def tokenizer_from_gguf(meta: dict, arch: str):
    """Build a ``PreTrainedTokenizerFast`` from GGUF metadata (``meta``: key -> python value)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    if "tokenizer.ggml.tokens" not in meta:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); "
                        "convert from the original Hugging Face directory instead")
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise UserError(f"cannot rebuild the GGUF tokenizer of {arch!r}: tokenizer.ggml.model is {kind!r}, "
                        f"supported: {', '.join(sorted(_BUILDERS))}; convert from the Hugging Face directory instead")
    backend = _BUILDERS[kind](meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    # llama.cpp matches control and user-defined tokens whole, before any split.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    specials = {name: tokens[int(meta[key])] for name, key in _SPECIAL_IDS.items()
                if key in meta and 0 <= int(meta[key]) < len(tokens)}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and "bos_token" in specials:
        bos = specials["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    else:
        backend.post_processor = None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)
    tok.add_bos_token = add_bos
    template = meta.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok
