"""A task's JSON schema file: loading and checking it, its instruction, its grounded-field mark.

The schema is the task (``extract``, ``prepare-reviews``, ``eval --task json-fields``): its
``description`` is the instruction, its structure what constrained decoding enforces. Kept below
the apps so that evaluation reads the same file the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "recipes" / "schemas" / "aspects.json"
# a schema's string property marked ``"x-span-of-text": true`` is grounded by default: ``extract``
# constrains its values to spans of the row's text (``apps/answer.py: with_spans``). JSON Schema ignores
# unknown keywords (the meta-schema check, jsonschema's validation, llama-cpp-python's converter and
# llguidance all pass it by); ``extract`` still strips it before handing a schema on.
SPAN_KEY = "x-span-of-text"
FALLBACK_INSTRUCTION = "Extract the information the JSON schema asks for from the text below. Answer with JSON only."


def instruction_of(schema: dict) -> str:
    desc = schema.get("description")
    return desc.strip() if isinstance(desc, str) and desc.strip() else FALLBACK_INSTRUCTION


def load_schema(path: str | Path | None = None) -> dict:
    """A JSON schema file, checked against the JSON Schema meta-schema (one-line errors)."""
    import jsonschema

    p = Path(path) if path else DEFAULT_SCHEMA
    require(p.is_file(), f"--schema {str(p)!r}: file not found; give a JSON schema file such as "
                         f"recipes/schemas/aspects.json")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"--schema {p}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    require(isinstance(schema, dict), f"--schema {p}: a JSON schema is an object, got {type(schema).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"--schema {p}: not a valid JSON schema ({e.message}); fix the file") from None
    return schema


def unmarked(node):
    """A copy of the schema without SPAN_KEY (what grammar compilers and validators are given)."""
    if isinstance(node, list):
        return [unmarked(v) for v in node]
    if isinstance(node, dict):
        return {k: unmarked(v) for k, v in node.items() if k != SPAN_KEY}
    return node
