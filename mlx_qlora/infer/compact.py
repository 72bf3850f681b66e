"""The compact answer form: what the model writes instead of the schema's JSON (issue #26).

On a compute-bound CPU every token the model evaluates costs the same, forced or not, and most
tokens of a JSON answer are keys, quotes and braces. For a schema shaped as "one array of flat
items" (``{"aspects": [{"term": str, "sentiment": enum}]}``, NER-like lists, labelled spans) the
model writes one line per item instead: the item's enum fields first, then at most one free-text
field, separated by single spaces, each line ending in a newline::

    positive cripsy squid
    neutral drinks

The program expands that into the schema's JSON deterministically (``to_json``); training rows
are written the same way (``to_text``), so the fine-tuned model learns the short form. Enum
values come first because each is one word the grammar finishes after its first token, and the
free text last so it needs no quoting: it runs to the end of the line. On SmolLM2's tokenizer a
MAMS item costs 2 tokens plus its term instead of ~12 (``{"term": "``, ``", "sentiment": "``...).

A schema of any other shape is refused with one line naming the fix (``--answer json``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, require
from .schema_file import SPAN_KEY


@dataclass(frozen=True)
class Field:
    name: str
    enum: tuple[str, ...] | None      # None: free text (the last field)
    min_len: int = 0
    max_len: int | None = None


@dataclass(frozen=True)
class CompactForm:
    key: str                          # the root's array property
    fields: tuple[Field, ...]         # enum fields first, then at most one free-text field
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
        return cls(key, tuple(enums + free), arr.get("maxItems"), int(arr.get("minItems", 0)))

    # ---- JSON <-> lines -----------------------------------------------------------------------
    def to_text(self, obj: dict) -> str:
        """The compact text of a schema-valid object (a training target)."""
        lines = []
        for item in obj[self.key]:
            vals = [str(item[f.name]) for f in self.fields]
            free = self.fields[-1].enum is None
            require(not free or (vals[-1] and "\n" not in vals[-1] and vals[-1] == vals[-1].strip()),
                    f"compact form: {self.fields[-1].name} {vals[-1]!r} is empty, has a line break or "
                    f"outer spaces; it cannot be written on one line")
            lines.append(" ".join(vals) + "\n")
        return "".join(lines)

    def to_json(self, text: str) -> dict:
        """The schema's object for a compact answer (a ValueError names a malformed line)."""
        items = []
        for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
            if not line and not text.strip():
                continue
            parts = line.split(" ", len(self.fields) - 1) if self.fields[-1].enum is None else line.split(" ")
            if len(parts) != len(self.fields):
                raise ValueError(f"line {n} {line!r} has {len(parts)} fields, expected {len(self.fields)}")
            item = {}
            for f, v in zip(self.fields, parts):
                if f.enum is not None and v not in f.enum:
                    raise ValueError(f"line {n}: {f.name} {v!r} is not one of {', '.join(f.enum)}")
                item[f.name] = v
            items.append(item)
        return {self.key: items}

    def instruction(self, schema: dict) -> str:
        """The system turn for this form: the task's title and the line layout (short: the model
        is fine-tuned on it; the turn is the shared prefix, evaluated once per job)."""
        title = str(schema.get("title") or "Items").strip()
        layout = " ".join(f.name for f in self.fields)
        return f"{title}: one line per item: {layout}"
