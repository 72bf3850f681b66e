"""GGUF tokenizer metadata -> a Hugging Face fast tokenizer (tokenizer.json + config).

transformers already knows how to rebuild BPE (GPT-2 style) and SentencePiece vocabularies from
llama.cpp's keys; we hand it the metadata and then fix what it does not know: llama.cpp's
pre-tokenizer names (``tokenizer.ggml.pre``) that it lacks, special tokens, BOS handling and the
chat template. The result must tokenize exactly like llama.cpp does (tests check it).
"""
from __future__ import annotations

from ..errors import UserError

# llama.cpp's `tokenizer.ggml.pre` names that transformers does not map, -> the HF pre-tokenizer
# that reproduces llama.cpp's split. SmolLM splits every digit on its own, then GPT-2's regex.
_DIGITS_THEN_BYTELEVEL = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
EXTRA_PRE_TOKENIZERS = {"smollm": _DIGITS_THEN_BYTELEVEL}

# llama.cpp metadata key -> the name transformers' GGUF tokenizer builder expects.
_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def tokenizer_from_gguf(meta: dict, arch: str):
    """Build a ``PreTrainedTokenizerFast`` from GGUF metadata (``meta``: key -> python value)."""
    import json

    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in meta:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); "
                        "convert from the original Hugging Face directory instead")
    td = {name: meta[key] for key, name in _TOKENIZER_KEYS.items() if key in meta}
    try:
        backend, _ = convert_gguf_tokenizer(arch, td)
    except ValueError as e:
        raise UserError(f"cannot rebuild the GGUF tokenizer: {e}") from None
    state = json.loads(backend.to_str())
    pre = td.get("tokenizer_type") == "gpt2" and td.get("pre_tokenizer_type")
    if pre in EXTRA_PRE_TOKENIZERS:
        state["pre_tokenizer"] = EXTRA_PRE_TOKENIZERS[pre]
    if td.get("tokenizer_type") == "llama":
        # SentencePiece (and llama.cpp) always add the dummy "▁" prefix; HF's Metaspace skips it
        # when the text already starts with a space, so "  x" would tokenize differently.
        steps = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
        if td.get("add_prefix_space", True):
            steps.insert(0, {"type": "Prepend", "prepend": "\u2581"})
        state["normalizer"] = {"type": "Sequence", "normalizers": steps}
        state["pre_tokenizer"] = None
    backend = Tokenizer.from_str(json.dumps(state))

    tokens = td["tokens"]
    specials = {name: tokens[int(meta[key])] for name, key in _SPECIAL_IDS.items()
                if key in meta and 0 <= int(meta[key]) < len(tokens)}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", td.get("tokenizer_type") == "llama"))
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
