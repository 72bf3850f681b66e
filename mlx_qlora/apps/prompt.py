"""The one prompt template that training rows, evaluation and extraction all use.

A task is a JSON schema file: its ``description`` is the instruction, its structure is what
constrained decoding enforces. The instruction is the system turn and the text the user turn,
so every row of a job shares the same token prefix (system turn + the user turn's header) that
an engine evaluates once, and no default system prompt of the chat template is paid for.
``messages`` is the only place that layout is written; training rows, ``eval`` and ``extract``
all call it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "recipes" / "schemas" / "aspects.json"
# a schema's string property marked ``"x-span-of-text": true`` is grounded by default: ``extract``
# constrains its values to spans of the row's text (``extract.with_spans``). JSON Schema ignores
# unknown keywords (the meta-schema check, jsonschema's validation, llama-cpp-python's converter and
# llguidance all pass it by); ``extract`` still strips it before handing a schema on.
SPAN_KEY = "x-span-of-text"
FALLBACK_INSTRUCTION = "Extract the information the JSON schema asks for from the text below. Answer with JSON only."


def messages(instruction: str, text: str, answer: str | None = None) -> list[dict]:
    """Chat messages for one row (plus the assistant's ``answer`` for a training row)."""
    out = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


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
