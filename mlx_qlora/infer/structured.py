"""Structured output: a JSON schema turned into a token constraint for each engine.

No JSON state machine is written here; both engines use a maintained grammar library:
- llama.cpp: its own grammar sampler, fed the GBNF that llama-cpp-python's
  ``LlamaGrammar.from_json_schema`` writes (``llamacpp_grammar``; the batched extractor uses
  the same GBNF, see ``engines/llamacpp_batch.py``).
- MLX: llguidance (``LLMatcher`` over the model's Hugging Face tokenizer) computes the allowed
  token bitmask each step; ``GuidanceConstraint.mask`` sets every other logit to -inf.

``json_object`` requests (OpenAI's ``{"type": "json_object"}``) use ``ANY_OBJECT``.
"""
from __future__ import annotations

import json

from ..errors import UserError

ANY_OBJECT = {"type": "object"}
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def check_schema(schema) -> dict:
    """``schema`` if it is a valid JSON schema object, else UserError naming the problem."""
    import jsonschema

    if not isinstance(schema, dict):
        raise UserError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"not a valid JSON schema: {e.message}") from None
    return schema


def schema_from_response_format(rf) -> dict | None:
    """OpenAI's ``response_format`` -> the JSON schema to enforce (None for plain text), or UserError."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise UserError("response_format.json_schema.schema must be a JSON schema object")
        return check_schema(spec["schema"])
    raise UserError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")


_LLAMACPP_IGNORES = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}


def _keywords(node) -> set[str]:
    """Every key used anywhere in a schema (property names included: over-cautious, cheap)."""
    if isinstance(node, dict):
        return set(node).union(*(_keywords(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_keywords(v) for v in node))
    return set()


def llamacpp_grammar(schema: dict):
    """A ``LlamaGrammar`` for ``schema`` (llama-cpp-python's converter), or UserError."""
    from llama_cpp.llama_grammar import LlamaGrammar

    ignored = sorted(_keywords(schema) & _LLAMACPP_IGNORES)
    if ignored:  # refuse rather than hand back output the schema rejects
        raise UserError(f"llama.cpp's JSON-schema grammar does not enforce {', '.join(ignored)}; use an enum "
                        f"instead, or the MLX engine (llguidance enforces them)")
    try:
        gbnf = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)._grammar
    except Exception as e:  # the converter raises bare Exception/ValueError/KeyError on unsupported input
        raise UserError(f"llama.cpp cannot turn the JSON schema into a grammar ({type(e).__name__}: {e}); "
                        f"simplify the schema (plain types, properties, enum, arrays)") from None
    # llama-cpp-python's converter lets raw control characters into strings, which JSON forbids;
    # llama.cpp's own (C++) converter excludes them: use its rule.
    gbnf = gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)
    return LlamaGrammar.from_string(gbnf, verbose=False)


_TOKENIZERS: dict[tuple, object] = {}
# json.dumps' layout and no free whitespace: bounded output (llguidance's default lets a model
# emit whitespace forever) in the form the training rows use
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuidanceConstraint:
    """llguidance's matcher for one generation: ``mask`` the logits, then ``accept`` the token."""

    def __init__(self, hf_tokenizer, schema: dict | None, n_vocab: int, eos_ids: set[int],
                 lark: str | None = None):
        """Constrained to ``schema`` (JSON in json.dumps' layout) or, when given, to ``lark`` (an
        llguidance lark grammar, e.g. the compact answer form's, ``apps/compact_grammar.py``)."""
        import llguidance
        import llguidance.hf

        key = (id(hf_tokenizer), n_vocab)
        if key not in _TOKENIZERS:  # ~1 s to build; once per tokenizer
            _TOKENIZERS[key] = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab,
                                                            eos_token=sorted(eos_ids) or None)
        what = "the grammar" if lark is not None else "the JSON schema"
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark) if lark is not None else \
                llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        except ValueError as e:
            raise UserError(f"llguidance cannot compile {what}: {e}") from None
        self.matcher = llguidance.LLMatcher(_TOKENIZERS[key], grammar, log_level=0)
        if self.matcher.is_error():
            raise UserError(f"llguidance cannot compile {what}: {self.matcher.get_error()}")
        self.n_vocab = n_vocab

    def allowed(self):
        """Boolean numpy mask of the tokens the grammar allows next."""
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self.n_vocab)
        fill_next_token_bitmask(self.matcher, bits, 0)
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)

    def mask(self, logits):
        """MLX logits (…, vocab) with every token the grammar forbids at -inf."""
        import mlx.core as mx

        allowed = mx.array(self.allowed())
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        if self.matcher.is_error():
            raise RuntimeError(f"llguidance rejected token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (the JSON value is complete)."""
        return self.matcher.is_stopped()
