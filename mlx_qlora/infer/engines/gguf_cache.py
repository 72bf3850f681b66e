"""The GGUF behind an MLX model directory, so that ``--engine auto`` runs llama.cpp on a CPU.

Looked for in this order, without a flag:

1. the GGUF the directory records (``gguf_source.json``, see ``model.model_io.record_gguf``):
   ``convert`` records its source GGUF when it kept every block exactly, and a GGUF built here is
   recorded the same way; a record whose weight files or GGUF changed since is void;
2. a GGUF the user put in the directory (``model.gguf``, or its only non-adapter ``*.gguf``);
3. built now, once, as ``model.gguf`` in the directory, when the MLX weights have an exact GGUF
   form (``export.gguf.lossless_type``: Q4_1 from 4-bit groups of 32*k with fp16 scales, F16/F32
   from floats); written to a temporary file, checked tensor by tensor, then renamed.

Otherwise the MLX engine runs, and the caller says in one line why and how to get the GGUF.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import UserError
from ...model.model_io import record_gguf, recorded_gguf

CACHED_NAME = "model.gguf"
EXPORT_HINT = "mlx_qlora export {d} -o {d}/model.gguf"


def _gguf_in_dir(d: Path, skip: Path | None = None) -> Path | None:
    hits = [p for p in sorted(d.glob("*.gguf")) if not p.name.startswith(".") and p != skip
            and "lora" not in p.name and "adapter" not in p.name]
    named = [p for p in hits if p.name == CACHED_NAME]
    return named[0] if named else hits[0] if len(hits) == 1 else None


def find_gguf(model_dir: Path) -> tuple[Path | None, str]:
    """``(GGUF, where it came from)`` for ``model_dir``, writing nothing; ``(None, "")`` if none."""
    path, rec = recorded_gguf(model_dir)
    if path is not None:
        return path, f"{path} ({rec.get('how', 'recorded')})"
    stale = model_dir / rec["gguf"] if rec else None  # a cached file built for other weights
    hit = _gguf_in_dir(model_dir, skip=stale)
    return hit, (f"{hit} (found in the model directory)" if hit else "")


def build_gguf(model_dir: Path, say=print) -> tuple[Path | None, str]:
    """``(model_dir/model.gguf, "")`` when the weights have an exact GGUF form and the file could
    be written there (``say`` gets one line before the work starts), else ``(None, why not)``."""
    from ...export import ExportConfig
    from ...export.fuse import read_weights
    from ...export.gguf import export_merged_gguf, gguf_arch, lossless_type

    config = json.loads((model_dir / "config.json").read_text())
    try:
        gguf_arch(config)
        type_name, why = lossless_type(read_weights(model_dir), config)
    except UserError as e:
        return None, str(e)
    if type_name is None:
        return None, why
    out = model_dir / CACHED_NAME
    tmp = model_dir / f".{CACHED_NAME}.building-{os.getpid()}.gguf"
    say(f"engine: llama.cpp; writing {out}, a lossless {type_name.upper()} copy of the weights, once "
        f"(later runs reuse it)")
    try:
        report = export_merged_gguf(ExportConfig(model=str(model_dir), out=str(tmp), type=type_name,
                                                 modelfile=False, force=True))
        lossy = [f"{name} ({how}, error {err:.1e})" for name, _, how, err in report.tensors
                 if how not in ("exact", "float") or err > 0] + report.notes
        if lossy:
            return None, f"its GGUF would not be exact: {lossy[0]}"
        os.replace(tmp, out)
        record_gguf(model_dir, out, f"built from the MLX weights, lossless {type_name.upper()}")
    except (UserError, OSError) as e:  # a read-only directory, a full disk
        return None, f"no GGUF could be written in {model_dir} ({e})"
    finally:
        tmp.unlink(missing_ok=True)
    return out, ""
