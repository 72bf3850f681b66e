"""Draft tokens for ``BatchDecoder``: what a row will most likely write next, so the model checks
several positions of that row in one batched ``llama_decode`` instead of one step each.

Drafts are only proposals: the decoder keeps a drafted token only where the grammar-constrained
argmax at that position is that very token, so the answers are those of plain greedy decoding,
token for token (tests/test_extract_drafts.py compares every logit). Sources, per position:

- forced bytes (jump-forward): where the JSON schema allows the next bytes one way only (keys,
  quotes, the rest of an enum value once its first token is out), llguidance's matcher gives them
  (``LLMatcher.compute_ff_tokens``). It follows the schema in json.dumps' layout (the training
  rows') while the row does, then in the one-optional-space layout of llama-cpp-python's GBNF.
- the model's habits: the token the model wrote after the same 3 tokens in earlier rows, nearly
  always (llama.cpp's lookup decoding keeps such an n-gram cache). This picks the model's own
  split of forced bytes (a base model writes ``as`` ``pe`` ``c`` ``ts`` where llguidance's
  canonical split is ``as`` ``pects``, and a split other than the model's is thrown away).
- prompt lookup (``--drafts all``): the tokens that followed the row's last written tokens in the
  row's own text (an aspect term copied from the review). Tokens are compared by their text without
  spaces, case-folded: a term's first word inside a JSON string is ``soup`` where the review had
  `` soup``; the drafted continuation is then the review's own tokens (`` roll`` after ``lobster``).

On a compute-bound CPU a drafted token costs as much to evaluate as any other, kept or not: drafts
save decode steps (the per-step cost of a ``llama_decode``), not evaluated tokens.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

from ..structured import JSON_LAYOUT

# Llama -> llguidance tokenizer (~1 s to build); weak, so a closed model's entry goes with it (an
# address would be reused by the next model loaded)
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
LOOKUP_NGRAMS = (3, 2, 1)                # longest match first: the most specific continuation
LOOKUP_DRAFT = 4                         # tokens per prompt-lookup draft: a wrong one costs as
#                                          much to evaluate as a right one, so drafts stay short
HABIT_CONTEXT = 3                        # output tokens a habit is keyed by
HABIT_MIN, HABIT_SHARE = 2, 0.9          # a habit: seen at least twice, and 9 times in 10


def llg_tokenizer(llm):
    """llguidance's tokenizer for a llama-cpp-python model (built from its vocabulary, cached)."""
    import llama_cpp as lc
    from llguidance.llamacpp import lltokenizer_from_vocab

    if llm not in _TOKENIZERS:
        with warnings.catch_warnings():   # it reads each token's attributes by a deprecated name
            warnings.simplefilter("ignore", DeprecationWarning)
            _TOKENIZERS[llm] = lltokenizer_from_vocab(lc.llama_model_get_vocab(llm.model))
    return _TOKENIZERS[llm]


# The layouts a row's output is followed in, first that still matches: json.dumps' (the training
# rows', most forced bytes), then the one optional space between JSON tokens that the GBNF of
# llama-cpp-python's converter allows (``space ::= " "?``), a superset of what llama.cpp accepts
LAYOUTS = (JSON_LAYOUT, {"whitespace_flexible": True, "whitespace_pattern": " ?"})


def schema_grammars(schema: dict) -> list[str]:
    """llguidance's grammars for ``schema``, one per layout of ``LAYOUTS`` (those it compiles)."""
    import llguidance

    out = []
    for layout in LAYOUTS:
        try:
            out.append(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=layout))
        except ValueError:   # llama.cpp's converter took the schema: drafts are optional
            pass
    return out


@dataclass
class DraftCounts:
    """Tokens per kind, summed over rows (all counts are tokens)."""
    forced: int = 0        # drafted by the grammar (forced) and kept
    lookup: int = 0        # drafted otherwise (the model's habits, prompt lookup) and kept
    sampled: int = 0       # chosen at a position no kept draft covered (the model's own choices)
    rejected: int = 0      # drafted, evaluated, and thrown away (wasted evaluations)
    steps: int = 0         # batched llama_decode steps of the generation loop (not prompts)

    def add(self, other: "DraftCounts") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class Drafter:
    """Makes a ``RowDrafts`` per row: forced tokens from ``schema``, the model's habits across rows,
    prompt lookup; holds what all rows share (llguidance's tokenizer and matchers, the habits)."""

    def __init__(self, llm, schema: dict | None = None, forced: bool = True, lookup: bool = True,
                 habits: bool = True, max_draft: int = 16):
        import llama_cpp as lc

        # a row's last token + its draft stay under 64 tokens: from 64 queries per KV stream ggml's
        # CPU flash attention takes a tiled path that sums in another order (other logits)
        assert 0 < max_draft < 63, max_draft
        self.llm, self.lookup, self.habits, self.max_draft = llm, lookup, habits, max_draft
        self.tokenizer = llg_tokenizer(llm) if forced and schema is not None else None
        self._matchers = self._compile(schema) if self.tokenizer is not None else []
        vocab = lc.llama_model_get_vocab(llm.model)
        self.eog = lambda t: lc.llama_vocab_is_eog(vocab, t)
        self._keys: dict[int, bytes] = {}
        # the tokens the model wrote after each HABIT_CONTEXT tokens of its output, over all rows:
        # {context: {next token: times}} (llama.cpp's lookup decoding keeps such an n-gram cache)
        self.seen: dict[tuple, dict[int, int]] = {}

    def key(self, tok: int) -> bytes:
        k = self._keys.get(tok)
        if k is None:
            k = self._keys[tok] = self.llm.detokenize([tok]).strip().lower()
        return k

    def habit(self, context: tuple) -> int | None:
        """The token the model wrote after ``context`` at least HABIT_MIN times and at least
        HABIT_SHARE of the times (a key, a quote, its own way of splitting them), else None."""
        nexts = self.seen.get(context) if self.habits else None
        if not nexts:
            return None
        tok, n = max(nexts.items(), key=lambda kv: kv[1])
        return tok if n >= HABIT_MIN and n >= HABIT_SHARE * sum(nexts.values()) else None

    def row(self, text_tokens: list[int], schema: dict | None = None) -> "RowDrafts":
        """Drafts for one row whose own text is ``text_tokens`` (what lookup copies from); a row's
        own schema (its ``Job.gbnf``'s, e.g. spans of its text) replaces the default one."""
        if self.tokenizer is None:
            return RowDrafts(self, text_tokens, [])
        matchers = self._compile(schema) if schema is not None else self._matchers
        return RowDrafts(self, text_tokens, [m.deep_copy() for m in matchers])

    def _compile(self, schema: dict) -> list:
        import llguidance

        out = [llguidance.LLMatcher(self.tokenizer, g, log_level=0) for g in schema_grammars(schema)]
        return [m for m in out if not m.is_error()]


class RowDrafts:
    def __init__(self, drafter: Drafter, text_tokens: list[int], matchers: list):
        self.d, self.matchers = drafter, matchers   # llguidance's LLMatchers of the row, per layout
        self.ids: list[int] = []             # the row's text, then what it wrote
        self.keys: list[bytes] = []
        self.index: dict[tuple, int] = {}    # n-gram of keys -> where it last ended (index in ids),
        #                                      only occurrences that something followed
        for t in text_tokens:
            self._push(t)
        self.out: list = [None] * HABIT_CONTEXT   # what the row wrote, after a start marker

    def _push(self, tok: int) -> None:
        # index the n-grams that end just before ``tok``: they now have a continuation, and the
        # row's own last n tokens (the lookup key) are never found as their own match
        end = len(self.ids) - 1
        for n in LOOKUP_NGRAMS:
            if end + 1 >= n:
                self.index[tuple(self.keys[end + 1 - n:end + 1])] = end
        self.ids.append(tok)
        self.keys.append(self.d.key(tok))

    def accept(self, tok: int) -> None:
        """The row wrote ``tok`` (after the decoder checked it against llama.cpp's grammar)."""
        # a layout the row left (json.dumps' after a free space) drafts no more
        self.matchers = [m for m in self.matchers if m.consume_token(tok)]
        nexts = self.d.seen.setdefault(tuple(self.out[-HABIT_CONTEXT:]), {})
        nexts[tok] = nexts.get(tok, 0) + 1
        self.out.append(tok)
        self._push(tok)

    def propose(self) -> tuple[list[int], list[bool]]:
        """(draft tokens, for each whether the schema forced its bytes); no end-of-generation token.

        Position by position: the model's habit where it has one and the schema allows it, else
        the first of llguidance's forced tokens (its own split of the forced bytes); where neither
        applies the draft ends, and an empty draft falls back to prompt lookup."""
        m = self.matchers[0] if self.matchers else None
        draft, forced = [], []
        context = list(self.out[-HABIT_CONTEXT:])
        while len(draft) < self.d.max_draft and (m is None or not m.is_stopped()):
            tok = self.d.habit(tuple(context))
            ff = m.compute_ff_tokens() if m is not None else []
            if tok is not None and m is not None and m.validate_tokens([tok]) != 1:
                tok = None
            if tok is None and ff:
                tok = ff[0]
            if tok is None or self.d.eog(tok):
                break
            draft.append(tok)
            forced.append(bool(ff))
            context = context[1:] + [tok]
            if m is not None and not m.consume_token(tok):   # cannot happen: validated or forced
                break
        if m is not None and draft:
            m.rollback(len(draft))
        if draft or not self.d.lookup:
            return draft, forced
        draft = self._lookup()
        return draft, [False] * len(draft)

    def _lookup(self) -> list[int]:
        end = len(self.ids)
        for n in LOOKUP_NGRAMS:
            hit = self.index.get(tuple(self.keys[end - n:])) if end >= n else None
            if hit is None:
                continue
            draft = self.ids[hit + 1:min(hit + 1 + LOOKUP_DRAFT, end)]
            if self.matchers:                    # cut where the schema forbids it
                draft = draft[:self.matchers[-1].validate_tokens(draft)]
            if draft:
                return draft
        return []
