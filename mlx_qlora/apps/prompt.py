"""The one prompt template that training rows, evaluation and extraction all use.

A task is a JSON schema file: its ``description`` is the instruction, its structure is what
constrained decoding enforces. The user turn is the instruction, a blank line, then the text, so
every row of a job shares the same token prefix (the chat template's system turn + instruction)
and an engine evaluates it once. ``user_prompt`` is the only place that layout is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "recipes" / "schemas" / "aspects.json"
FALLBACK_INSTRUCTION = "Extract the information the JSON schema asks for from the text below. Answer with JSON only."
TEXT_LABEL = "Text"


def user_prompt(instruction: str, text: str) -> str:
    """The user turn for one row: instruction first (shared by all rows), the row's text last."""
    return f"{instruction}\n\n{TEXT_LABEL}: {text}"


def messages(instruction: str, text: str) -> list[dict]:
    """Chat messages for one row; the chat template adds the system turn and assistant prompt."""
    return [{"role": "user", "content": user_prompt(instruction, text)}]


def shared_prefix(instruction: str) -> str:
    """The part of the user turn every row shares (what is evaluated once per job)."""
    return user_prompt(instruction, "")


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
