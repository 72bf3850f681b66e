"""Read and write MLX model directories (the layout ``mlx_lm.load`` reads).

A model directory holds ``config.json`` (mlx-lm's keys, with ``quantization``),
``model.safetensors`` and the tokenizer files (tokenizer.json, tokenizer_config.json, chat
template). Everything else in the project reads and writes models through this module.
Writes are atomic: files go to a temporary sibling directory that is renamed into place, so an
interrupted or failed convert leaves nothing half-written and never clobbers a good model.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require


def normalize_config(cfg: dict) -> dict:
    """Put every value mlx-lm reads where it reads it.

    transformers 5 nests ``rope_theta`` (and the rope scaling type) under ``rope_parameters``;
    mlx-lm only reads the top-level key and silently falls back to 10000, giving a model that
    loads and talks, but wrongly (SmolLM2 needs 100000).
    """
    cfg = dict(cfg)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" not in cfg and "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        rtype = rp.get("rope_type", "default")
        if rtype not in (None, "default") and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    from .archs import normalize

    return normalize(cfg)


def write_model_dir(tmp: Path, weights: dict, config: dict, tokenizer=None) -> None:
    """Write weights, config and tokenizer into ``tmp`` (a directory from :func:`atomic_dir`)."""
    import mlx.core as mx

    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(normalize_config(config), indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def check_model_dir(path: str | Path) -> Path:
    """The directory as a Path, or a one-line error naming what is missing."""
    p = Path(path)
    require(p.exists(), f"model path {p} does not exist; give an MLX model directory (mlx_qlora convert -o DIR)")
    require(p.is_dir(), f"model path {p} is not a directory; give an MLX model directory")
    require((p / "config.json").exists(), f"{p} has no config.json; is it a model directory? (mlx_qlora convert makes one)")
    check_model_files(p)
    return p


def check_model_files(p: Path) -> None:
    """config.json a JSON object and every ``*.safetensors`` header whole (read by the
    safetensors library: header only, checked against the file size), or one UserError line."""
    from safetensors import safe_open

    cfg_file = p / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); fix it or re-create the model with mlx_qlora convert") from None
    require(isinstance(cfg, dict), f"{cfg_file} is not a JSON object; re-create the model with mlx_qlora convert")
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "numpy"):
                pass
        except Exception as e:  # SafetensorError / OSError: a cut or damaged file
            raise UserError(f"{f} is not a readable safetensors file ({e}); the model directory is damaged: "
                            "re-create it with mlx_qlora convert") from None


def load(path: str | Path, dtype=None, lazy: bool = False, dequantize: bool = False):
    """``(model, tokenizer)`` from an MLX model directory; ``dtype`` casts the float parameters
    (not the packed weights), e.g. to float32 for CPU work. ``dequantize`` turns quantized layers
    back into float ones holding exactly the dequantized weights: the same math, but MLX's CPU
    ``quantized_matmul`` is naive, so whole-sequence forwards run ~5x faster this way."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load as mlx_lm_load

    p = check_model_dir(path)
    model, tokenizer = mlx_lm_load(str(p), lazy=lazy)
    if dtype is not None:
        model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    return model, tokenizer


def read_config(path: str | Path) -> dict:
    return json.loads((check_model_dir(path) / "config.json").read_text())


# ---- the GGUF that holds exactly this directory's weights (the llama.cpp engine runs it on CPU)
GGUF_RECORD = "gguf_source.json"


def _weights_stamp(model_dir: Path) -> list:
    """(name, size, mtime_ns) of the weight files: a record made for other weights (a fused
    model that copied the directory's extra files, a re-converted one) no longer matches."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in Path(model_dir).glob("*.safetensors"))


def record_gguf(model_dir: Path, gguf: Path, how: str) -> None:
    """Note in ``model_dir`` that ``gguf`` holds exactly its weights (``how`` says why), with the
    GGUF's size and mtime and the weight files' stamps, so a changed file voids the record."""
    from ..atomic import atomic_file

    model_dir, gguf = Path(model_dir), Path(gguf)
    st = gguf.stat()
    inside = gguf.resolve().parent == model_dir.resolve()
    rec = {"gguf": gguf.name if inside else str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "how": how, "weights": _weights_stamp(model_dir)}
    with atomic_file(model_dir / GGUF_RECORD, force=True) as tmp:
        tmp.write_text(json.dumps(rec, indent=2) + "\n")


def recorded_gguf(model_dir: Path) -> tuple[Path | None, dict | None]:
    """``(GGUF, record)`` when ``model_dir`` records a GGUF that still holds its weights;
    ``(None, record)`` when the record is out of date, ``(None, None)`` when there is none."""
    try:
        rec = json.loads((Path(model_dir) / GGUF_RECORD).read_text())
    except (OSError, ValueError):
        return None, None
    try:
        path = Path(model_dir) / rec["gguf"]  # an absolute path stays absolute
        st = path.stat()
        current = [st.st_size, st.st_mtime_ns] == [rec["size"], rec["mtime_ns"]] and \
            rec["weights"] == _weights_stamp(model_dir)
    except (OSError, KeyError, TypeError):
        return None, rec if isinstance(rec, dict) else None
    return (path, rec) if current else (None, rec)
