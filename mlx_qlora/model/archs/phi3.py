"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (llama.cpp keeps them
fused too: ``attn_qkv`` and a double-width ``ffn_up``), NEOX rope over ``partial_rotary_factor``
of each head (Phi-4-mini: 0.75), so no Q/K permutation.

LongRoPE (Phi-3-128k, Phi-4-mini): per rotary pair, frequencies are divided by ``short_factor``
up to ``original_max_position_embeddings`` tokens and by ``long_factor`` beyond (transformers
decides by sequence length, llama.cpp by context size), with attention scaled by
``sqrt(1 + ln(max_pos / original) / ln(original))`` either way. mlx-lm's phi3 applies the long
factors at every length, so the converter hands it the short ones (``long_factor`` := short,
the checkpoint's own long factors kept as ``long_factor_checkpoint``): MLX then equals
transformers up to ``original_max_position_embeddings`` (4096: fine-tuning lengths) and uses the
short factors beyond. Export writes both factor tensors, as llama.cpp's converter does.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UserError
from . import Arch
from .llama import export_check as rope_check, from_gguf as rope_from_gguf, write_meta as rope_meta

LONGROPE = ("longrope", "su")
KEPT = "long_factor_checkpoint"


def _kind(cfg: dict):
    rs = cfg.get("rope_scaling") or {}
    return rs.get("rope_type") or rs.get("type")


def normalize(cfg: dict) -> dict:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if key in rp:
                cfg.setdefault(key, rp[key])
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict) and _kind(cfg) in LONGROPE:
        rs = dict(rs)
        rs["type"] = _kind(cfg)                      # mlx-lm's phi3 reads "type"
        if KEPT not in rs and "short_factor" in rs and "long_factor" in rs:
            rs[KEPT], rs["long_factor"] = rs["long_factor"], rs["short_factor"]
        cfg["rope_scaling"] = rs
    return cfg


def rope_dims(cfg: dict) -> int:
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hd * float(cfg.get("partial_rotary_factor") or 1.0))


def check(cfg: dict) -> None:
    kind = _kind(cfg)
    if kind not in (None, "default", "linear") + LONGROPE:
        raise UserError(f"phi3 rope scaling {kind!r} is not supported (longrope and linear are)")
    if kind in LONGROPE:
        rs, half = cfg["rope_scaling"], rope_dims(cfg) // 2
        for key in ("short_factor", "long_factor"):
            v = rs.get(key)
            if not (isinstance(v, list) and len(v) == half):
                raise UserError(f"config.json: longrope '{key}' must list {half} factors (one per rotary pair); "
                                "fix or re-download config.json")
        if not cfg.get("original_max_position_embeddings"):
            raise UserError("config.json lacks 'original_max_position_embeddings', which longrope needs; "
                            "fix or re-download config.json")


def _attn_factor(cfg: dict) -> float:
    orig = float(cfg["original_max_position_embeddings"])
    scale = float(cfg["max_position_embeddings"]) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0


def export_check(cfg: dict):
    return None if _kind(cfg) in LONGROPE else rope_check(cfg)


def write_meta(w, cfg: dict) -> None:
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    if _kind(cfg) in LONGROPE:
        w.add_rope_scaling_orig_ctx_len(int(cfg["original_max_position_embeddings"]))
        w.add_rope_scaling_attn_factors(_attn_factor(cfg))
    else:
        rope_meta(w, cfg)


def extra_tensors(cfg: dict) -> dict:
    if _kind(cfg) not in LONGROPE:
        return {}
    rs = cfg["rope_scaling"]
    return {"rope_factors_long.weight": np.asarray(rs.get(KEPT, rs["long_factor"]), dtype=np.float32),
            "rope_factors_short.weight": np.asarray(rs["short_factor"], dtype=np.float32)}


def from_gguf(meta: dict, arch: str, cfg: dict, tensors) -> None:
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    rd = meta.get(f"{arch}.rope.dimension_count", hd)
    cfg.pop("head_dim", None)   # phi3's head is hidden/heads; a smaller rope count is partial rotary
    if rd != hd:
        cfg["partial_rotary_factor"] = rd / hd
    if "rope_factors_long.weight" in tensors:
        if not isinstance(tensors, dict) or "rope_factors_short.weight" not in tensors:
            raise UserError("GGUF: rope_factors_long without rope_factors_short; the file is incomplete")
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if not isinstance(orig, int) or orig <= 0:
            raise UserError(f"GGUF metadata lacks {arch}.rope.scaling.original_context_length, which longrope "
                            "needs; the file is incomplete")
        cfg["original_max_position_embeddings"] = orig
        cfg["rope_scaling"] = {"type": "longrope",
                               "long_factor": [float(x) for x in np.asarray(tensors["rope_factors_long.weight"].data)],
                               "short_factor": [float(x) for x in np.asarray(tensors["rope_factors_short.weight"].data)]}
        normalize(cfg)
        return
    rope_from_gguf(meta, arch, cfg, tensors)


ARCHS = [Arch("phi3", ("phi3",), "phi3", normalize=normalize, check=check, export_check=export_check,
              write_meta=write_meta, extra_tensors=extra_tensors, from_gguf=from_gguf, rope_dims=rope_dims,
              gguf_extra=("rope_factors_long.weight", "rope_factors_short.weight"))]
