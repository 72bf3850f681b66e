"""The one prompt template that training rows, evaluation and extraction all use.

A task is a JSON schema file: its ``description`` is the instruction, its structure is what
constrained decoding enforces. The instruction is the system turn and the text the user turn,
so every row of a job shares the same token prefix (system turn + the user turn's header) that
an engine evaluates once, and no default system prompt of the chat template is paid for.
``messages`` is the only place that layout is written; training rows, ``eval`` and ``extract``
all call it.
"""
from __future__ import annotations

# the schema file itself (loading, instruction, the grounded-field mark): infer/schema_file.py


def messages(instruction: str, text: str, answer: str | None = None) -> list[dict]:
    """Chat messages for one row (plus the assistant's ``answer`` for a training row)."""
    out = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out
