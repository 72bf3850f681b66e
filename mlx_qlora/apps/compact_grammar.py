"""Grammars of the compact answer form (``compact.py``) for the two constraint engines.

``gbnf(form)`` feeds llama.cpp's grammar sampler (``BatchDecoder``), ``lark(form)`` llguidance
(the MLX engine, ``structured.GuidanceConstraint``); both describe the same language, which is
exactly what ``CompactForm.to_text`` writes and ``to_json`` reads back:

- ``minItems``..``maxItems`` lines, each ending in ``"\\n"``; end of generation only after a
  whole line (or at once, for an empty list when ``minItems`` is 0);
- a space (``compact.LEAD``; optional: a chat template that trims the answer drops the first
  line's in training), the free-text field, then the enum fields, each value whole, single
  spaces between;
- the free text ``minLength``..``maxLength`` characters (at least 1: an empty one would not
  survive ``to_text``), no control or line-break character, no white space at either end (what
  ``str.strip`` removes), so the program can split the line without quoting;
- with ``spans`` (grounded terms, see ``answer.text_spans``) the free text is one of them
  instead: the model copies a span of its review, it cannot invent or misspell one.
"""
from __future__ import annotations

import json
import re

from ..infer.compact import LEAD, CompactForm

# code points (inclusive ranges) that the free text never holds: C0 controls and DEL, and what
# Python's str.splitlines breaks at (the output is JSONL, read back line by line)
INNER_BANNED = ((0x00, 0x1F), (0x7F, 0x7F), (0x85, 0x85), (0x2028, 0x2029))
# ... nor starts or ends with: every code point where str.isspace() is true, as well
EDGE_BANNED = INNER_BANNED + ((0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                              (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))


def _class(ranges) -> "re.Pattern":
    return re.compile("[" + "".join(f"\\U{lo:08X}-\\U{hi:08X}" for lo, hi in ranges) + "]")


# one regex search per span (a per-character loop in Python cost ~2 ms per review of ~160 spans)
_INNER, _EDGE = _class(INNER_BANNED), _class(EDGE_BANNED)


def writable(text: str, field=None) -> bool:
    """Whether ``text`` can be the free text of a line (and fits ``field``'s length bounds)."""
    ok = bool(text) and not _EDGE.match(text[0]) and not _EDGE.match(text[-1]) and not _INNER.search(text)
    if ok and field is not None:
        ok = len(text) >= field.min_len and (field.max_len is None or len(text) <= field.max_len)
    return ok


def _bounds(lo: int, hi: int | None) -> str:
    return f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"


def _free_lengths(field) -> tuple[int, int | None]:
    """(min, max) characters of the free text; ``to_text`` refuses an empty one."""
    lo = max(1, field.min_len)
    hi = field.max_len
    if hi is not None and hi < lo:
        raise ValueError(f"{field.name}: maxLength {hi} < minLength {lo}")
    return lo, hi


def _free_pattern(field, cls) -> str:
    """The free text as edge, inner{..}, edge pieces; ``cls(ranges)`` writes a negated class."""
    lo, hi = _free_lengths(field)
    edge, inner = cls(EDGE_BANNED), cls(INNER_BANNED)
    if hi == 1:
        return edge
    rest = _bounds(max(0, lo - 2), None if hi is None else hi - 2)
    if lo <= 1:
        return f"{edge} ({inner}{rest} {edge})?"
    return f"{edge} {inner}{rest} {edge}"


def usable_spans(form: CompactForm, spans) -> list[str]:
    """The spans that fit the free-text field (length, no line break or outer space)."""
    return [s for s in spans if writable(s, form.free)]


# ---- llama.cpp (GBNF) -------------------------------------------------------------------------
def _gbnf_class(ranges) -> str:
    def one(c):
        return f"\\x{c:02X}" if c < 0x100 else f"\\u{c:04X}"
    return "[^" + "".join(one(lo) if lo == hi else f"{one(lo)}-{one(hi)}" for lo, hi in ranges) + "]"


def _gbnf_literal(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def gbnf(form: CompactForm, spans: list[str] | None = None) -> str:
    """llama.cpp's GBNF for ``form`` (``root``); with ``spans`` the free text is one of them.
    A ValueError when no line can be written but the schema asks for at least one."""
    return _grammar(form, spans, "root ::= ", " ::= ", _gbnf_literal, _gbnf_class, "f")


# ---- llguidance (lark) ------------------------------------------------------------------------
def _lark_class(ranges) -> str:
    def one(c):
        return f"\\x{{{c:X}}}"
    return "[^" + "".join(one(lo) if lo == hi else f"{one(lo)}-{one(hi)}" for lo, hi in ranges) + "]"


def lark(form: CompactForm, spans: list[str] | None = None) -> str:
    """llguidance's lark grammar for ``form`` (``start``); same language as ``gbnf``."""
    def regex_free(field, cls):
        return "/" + _free_pattern(field, cls).replace(" ", "") + "/"
    return _grammar(form, spans, "start: ", ": ", lambda s: json.dumps(s, ensure_ascii=False), _lark_class,
                    "F", regex_free)


def _grammar(form, spans, root, assign, literal, cls, prefix, regex_free=None) -> str:
    names = [f"{prefix}{i}" for i in range(len(form.fields))]
    rules = []
    for name, f in zip(names, form.fields):
        if f.enum is not None:
            rules.append(name + assign + " | ".join(literal(v) for v in f.enum))
        elif spans is not None:
            ok = usable_spans(form, spans)
            if not ok:   # no line can be written: only the empty list
                if form.min_items > 0:
                    raise ValueError(f"no span of the text fits {f.name} (length {f.min_len}..{f.max_len}, one line)")
                return root + '""\n'
            rules.append(name + assign + " | ".join(literal(s) for s in ok))
        else:
            rules.append(name + assign + (regex_free(f, cls) if regex_free else _free_pattern(f, cls)))
    # lark: the line is one terminal (upper case), so llguidance's lexer matches it as one regex and
    # can end the free text at any space before an enum value (as separate lexemes, the free text's
    # greedy lexeme would swallow " positive" and the line could never end); GBNF parses by characters
    item_name = "ITEM" if prefix.isupper() else "item"
    item = f"({literal(LEAD)})? " + ' " " '.join(names) + ' "\\n"'
    if form.max_items == 0:
        return root + '""\n'
    lines = [root + f"{item_name}{_bounds(form.min_items, form.max_items)}", item_name + assign + item, *rules]
    return "\n".join(lines) + "\n"
