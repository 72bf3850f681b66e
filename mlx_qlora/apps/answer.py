"""What a row of ``extract`` may write, and how it is read back (issue #26).

Two answer forms: ``json`` (the schema's JSON, constrained by the GBNF of llama-cpp-python's
converter on llama.cpp and by llguidance on MLX) and ``compact`` (one line per item, ``compact.py``,
constrained by ``compact_grammar.py`` and expanded into the JSON). In either, grounded string fields
may only take spans of the row's own text: a per-row grammar, so the model cannot invent or misspell
an aspect term. A field is grounded when the schema marks it (``schema_file.SPAN_KEY``, aspects.json's
``term``) or ``--span-field NAME`` names it; ``--span-field none`` grounds none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import require
from ..infer.schema_file import SPAN_KEY, instruction_of, unmarked

# a word ends at an apostrophe ("waiter" in "waiter's" is a span) and a span has up to 8 words: on
# MAMS that covers 99.8% of train and 99.9% of val reference terms (1..6 words, apostrophes inside
# words: 99.1%), with 157 spans per review on average (121)
WORD = re.compile(r"\w+(?:&\w+)*")
MAX_SPAN_WORDS = 8


def text_spans(text: str, max_len: int | None = None) -> list[str]:
    """Every run of 1..8 consecutive words of ``text``, as written (punctuation inside kept)."""
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    out = dict.fromkeys(text[words[i][0]:words[j][1]] for i in range(len(words))
                        for j in range(i, min(i + MAX_SPAN_WORDS, len(words))))
    return [s for s in out if max_len is None or len(s) <= max_len] or [text[:max_len or None]]


def with_spans(node, fields, text: str):
    """A copy of the schema whose string properties named in ``fields`` are an enum of text spans."""
    fields = {fields} if isinstance(fields, str) else set(fields)
    if isinstance(node, list):
        return [with_spans(v, fields, text) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: with_spans(v, fields, text) for k, v in node.items()}
    props = out.get("properties")
    for name in fields & set(props if isinstance(props, dict) else ()):
        spec = props[name]
        if isinstance(spec, dict) and spec.get("type") == "string":
            props[name] = {"enum": text_spans(text, spec.get("maxLength"))}
    return out


def _string_props(node, out=None) -> dict[str, dict]:
    """{name: spec} of every string property anywhere in a schema."""
    out = {} if out is None else out
    if isinstance(node, list):
        for v in node:
            _string_props(v, out)
    elif isinstance(node, dict):
        props = node.get("properties")
        for name, spec in (props.items() if isinstance(props, dict) else ()):
            if isinstance(spec, dict) and spec.get("type") == "string" and "enum" not in spec:
                out.setdefault(name, spec)
        for v in node.values():
            _string_props(v, out)
    return out


def span_fields(schema: dict, span_field: str | None) -> set[str]:
    """The grounded fields: ``--span-field NAME``'s, none for ``none``, else the schema's marked ones."""
    strings = _string_props(schema)
    if span_field is None:
        return {name for name, spec in strings.items() if spec.get(SPAN_KEY) is True}
    if span_field == "none":
        return set()
    require(span_field in strings, f"--span-field {span_field!r}: the schema has no string property of that name "
                                   f"(it has: {', '.join(sorted(strings)) or 'none'}); name one of them, or none")
    return {span_field}


@dataclass
class Answer:
    """What a row's output is constrained to, per engine, and how it is read back."""
    schema: dict                      # the JSON schema (SPAN_KEY stripped)
    grounded: set[str]                # string fields whose values are spans of the row's text
    form: object = None               # CompactForm for --answer compact, else None (JSON)

    @classmethod
    def of(cls, schema: dict, answer: str = "json", span_field: str | None = None) -> "Answer":
        """UserError (one line) for a schema the answer form cannot express or a bad --span-field."""
        from ..infer.compact import CompactForm

        grounded = span_fields(schema, span_field)
        schema = unmarked(schema)
        if answer == "json":
            return cls(schema, grounded)
        form = CompactForm.from_schema(schema)
        free = form.free.name if form.free is not None else None
        require(grounded <= {free}, f"--span-field {', '.join(sorted(grounded))}: with --answer compact only the "
                                    f"free-text field ({free or 'none here'}) can be grounded; use --span-field none")
        return cls(schema, grounded, form)

    def instruction(self) -> str:
        return self.form.instruction(self.schema) if self.form else instruction_of(self.schema)

    def _spans(self, text):
        if not self.grounded or text is None:
            return None
        return text_spans(text, self.form.free.max_len)

    def gbnf(self, text: str | None = None) -> str:
        """llama.cpp's grammar (of the row with ``text``, when grounded); ValueError when no line fits."""
        from ..infer.engines.llamacpp_batch import schema_to_gbnf
        from . import compact_grammar

        if self.form is not None:
            return compact_grammar.gbnf(self.form, self._spans(text))
        return schema_to_gbnf(self.row_schema(text))

    def row_schema(self, text: str | None = None) -> dict:
        return with_spans(self.schema, self.grounded, text) if self.grounded and text is not None else self.schema

    def sampling(self, sampling, text: str | None = None):
        """``sampling`` constrained for the MLX engine (llguidance: the JSON schema or a lark grammar)."""
        from . import compact_grammar

        if self.form is not None:
            sampling.json_schema, sampling.grammar = None, compact_grammar.lark(self.form, self._spans(text))
        else:
            sampling.json_schema, sampling.grammar = self.row_schema(text), None
        return sampling
