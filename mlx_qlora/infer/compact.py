"""The compact answer form: what the model writes instead of the schema's JSON (issue #26).

On a compute-bound CPU every token the model evaluates costs the same, forced or not, and most
tokens of a JSON answer are keys, quotes and braces. For a schema shaped as "one array of flat
items" (``{"aspects": [{"term": str, "sentiment": enum}]}``, NER-like lists, labelled spans) the
model writes one line per item instead: at most one free-text field first, then the item's enum
fields, separated by single spaces, each line starting with a space and ending in a newline::

     cripsy squid positive
     drinks neutral

The program expands that into the schema's JSON deterministically (``to_json``, which splits each
line from the right: enum values hold no space, so the free text may); training rows are written
the same way (``to_text``), so the fine-tuned model learns the short form. The free text comes
first so that each label is chosen after, and conditioned on, the text it qualifies (the aspect's
sentiment after its term, the issue's own ``term|sentiment``): with the labels first a greedy model
commits to a sentiment before naming the aspect it belongs to. The leading space (``LEAD``) makes
the term's first word the token the review has (" drinks", not "dr" "inks" as at a line's start).
Measured on MAMS val (docs/reviews-sweep.md, merged Q8_0): labels first, rank 32, two epochs: pair
F1 57.6; term first with the lead, rank 64, three epochs: 59.6. The lead alone is not separated:
halfway (step 810 of 1,620) the runs without / with it scored 56.3 / 55.0 (valid loss 0.58 / 0.53).
An enum value is one word and the newline ends the line, so nothing needs quoting. On SmolLM2's
tokenizer a MAMS item costs 2 tokens plus its term instead of ~12 (``{"term": "``, ``",
"sentiment": "``...).

A schema of any other shape is refused with one line naming the fix (``--answer json``).

Repeats: a line equal to an earlier line of the same answer is read once. Two identical items say
nothing one does not, and a small greedy model falls into repetition loops (" wait staff positive"
eleven times on one MAMS val review); the training data never repeats an item (MAMS train: 0 of
11,186 lines). Measured on all 500 MAMS val reviews with the shipped recipe (merged Q8_0): 21
repeated lines in 500 answers, pair F1 59.6 -> 60.05; lines that differ in any field are kept,
and so are the repeats when dropping them would leave fewer items than the schema's minItems (the
grammar forced that many lines; the answer stays valid).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, require
from .schema_file import SPAN_KEY


# every line starts with a space, so a word there is the token the text has mid-sentence
# (" drinks", not "dr" "inks" as at a line's start): the model copies its review's own tokens
LEAD = " "


@dataclass(frozen=True)
class Field:
    name: str
    enum: tuple[str, ...] | None      # None: free text (the first field)
    min_len: int = 0
    max_len: int | None = None


@dataclass(frozen=True)
class CompactForm:
    key: str                          # the root's array property
    fields: tuple[Field, ...]         # at most one free-text field first, then the enum fields
    max_items: int | None = None
    min_items: int = 0

    # ---- schema -> form ----------------------------------------------------------------------
    @classmethod
    def from_schema(cls, schema: dict) -> "CompactForm":
        """The form of ``schema``, or a UserError naming what does not fit and the fix."""
        fix = "; use --answer json for this schema"
        props = schema.get("properties")
        require(schema.get("type") == "object" and isinstance(props, dict) and len(props) == 1,
                f"--answer compact: the schema's root must be an object with exactly one property "
                f"(an array of items){fix}")
        (key, arr), = props.items()
        require(key in schema.get("required", []), f"--answer compact: the root property {key!r} must be required{fix}")
        items = arr.get("items") if isinstance(arr, dict) else None
        require(isinstance(arr, dict) and arr.get("type") == "array" and isinstance(items, dict)
                and items.get("type") == "object" and isinstance(items.get("properties"), dict),
                f"--answer compact: {key!r} must be an array of objects{fix}")
        iprops = items["properties"]
        require(set(items.get("required", [])) == set(iprops),
                f"--answer compact: every property of {key!r}'s items must be required "
                f"(missing: {', '.join(sorted(set(iprops) - set(items.get('required', []))))}){fix}")
        enums, free = [], []
        for name, spec in iprops.items():
            if isinstance(spec, dict) and isinstance(spec.get("enum"), list):
                vals = spec["enum"]
                require(all(isinstance(v, str) and v and not any(c.isspace() for c in v) for v in vals),
                        f"--answer compact: enum values of {name!r} must be non-empty strings without spaces{fix}")
                enums.append(Field(name, tuple(vals)))
            elif isinstance(spec, dict) and spec.get("type") == "string" and set(spec) <= {
                    "type", "minLength", "maxLength", "description", "title", SPAN_KEY}:
                free.append(Field(name, None, int(spec.get("minLength", 0)), spec.get("maxLength")))
            else:
                raise UserError(f"--answer compact: property {name!r} of {key!r}'s items must be a string "
                                f"enum or a plain string{fix}")
        require(len(free) <= 1, f"--answer compact: at most one free-text field per item, got "
                                f"{', '.join(f.name for f in free)}{fix}")
        require(enums or free, f"--answer compact: {key!r}'s items have no properties{fix}")
        return cls(key, tuple(free + enums), arr.get("maxItems"), int(arr.get("minItems", 0)))

    @property
    def free(self) -> Field | None:
        """The free-text field (written first on each line), or None."""
        return self.fields[0] if self.fields[0].enum is None else None

    # ---- JSON <-> lines -----------------------------------------------------------------------
    def to_text(self, obj: dict) -> str:
        """The compact text of a schema-valid object (a training target)."""
        lines = []
        for item in obj[self.key]:
            vals = [str(item[f.name]) for f in self.fields]
            require(self.free is None or (vals[0] and "\n" not in vals[0] and vals[0] == vals[0].strip()),
                    f"compact form: {self.fields[0].name} {vals[0]!r} is empty, has a line break or "
                    f"outer spaces; it cannot be written on one line")
            lines.append(LEAD + " ".join(vals) + "\n")
        return "".join(lines)

    def to_json(self, text: str) -> dict:
        """The schema's object for a compact answer (a ValueError names a malformed line)."""
        items = []
        for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
            if not line and not text.strip():
                continue
            # the lead is read back if there: a detokenizer may drop a first token's own space
            line = line[len(LEAD):] if line.startswith(LEAD) else line
            parts = line.rsplit(" ", len(self.fields) - 1) if self.free is not None else line.split(" ")
            if len(parts) != len(self.fields):
                raise ValueError(f"line {n} {line!r} has {len(parts)} fields, expected {len(self.fields)}")
            item = {}
            for f, v in zip(self.fields, parts):
                if f.enum is not None and v not in f.enum:
                    raise ValueError(f"line {n}: {f.name} {v!r} is not one of {', '.join(f.enum)}")
                item[f.name] = v
            items.append(item)
        # a line equal to an earlier one is read once (see Repeats), as far as minItems allows
        unique = [it for i, it in enumerate(items) if it not in items[:i]]
        return {self.key: unique if len(unique) >= self.min_items else items}

    def instruction(self, schema: dict) -> str:
        """The system turn for this form: the task's title and the line layout (short: the model
        is fine-tuned on it; the turn is the shared prefix, evaluated once per job)."""
        title = str(schema.get("title") or "Items").strip()
        layout = " ".join(f.name for f in self.fields)
        return f"{title}: one line per item: {layout}"
