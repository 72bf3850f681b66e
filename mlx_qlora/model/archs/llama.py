"""Llama 2/3/3.1/3.2, Mistral, TinyLlama, SmolLM2: the common case.

llama.cpp's llama architecture uses interleaved-pair ("normal") rope, so its converter permutes
Q/K rows; Mistral checkpoints are written as llama. Llama 3.1/3.2's ``llama3`` rope scaling
reaches llama.cpp as a ``rope_freqs`` tensor of per-pair frequency divisors (the GGUF has no key
for its parameters), computed here from the config as Hugging Face computes its inverse
frequencies. Reading such a GGUF back, the parameters are recovered from the divisors: they
depend only on ``factor`` (the largest) and the two wavelength thresholds, which the blended
pairs pin down (``original_max_position_embeddings`` fixed at 8192, ``low/high_freq_factor``
solved); the recovered set must reproduce every divisor, else the file is refused.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UserError
from . import Arch

ROPE_TYPES = (None, "default", "linear", "llama3")


def rope_type(config: dict):
    rs = config.get("rope_scaling") or {}
    return rs.get("rope_type") or rs.get("type")


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_freq_factors(config: dict) -> np.ndarray:
    """Per rotary pair, the divisor llama.cpp applies to ``theta^(-2i/d)`` (its ``rope_freqs``):
    1 for short wavelengths, ``factor`` for long ones, a smooth blend between (the rule Hugging
    Face's llama3 rope initialisation uses, with the config's own thresholds)."""
    rs = config["rope_scaling"]
    dim = head_dim(config)
    factor, low, high = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    inv = 1.0 / (float(config.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def export_check(config: dict):
    if rope_type(config) not in ROPE_TYPES:
        return (f"rope scaling {rope_type(config)!r} has no llama.cpp form here "
                f"(supported: {', '.join(t for t in ROPE_TYPES if t)})")
    return None


def write_meta(w, config: dict) -> None:
    import gguf

    if rope_type(config) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))


def extra_tensors(config: dict) -> dict:
    return {"rope_freqs.weight": llama3_freq_factors(config)} if rope_type(config) == "llama3" else {}


def llama3_from_factors(divisors, config: dict, old_ctx: float = 8192.0) -> dict | None:
    """The llama3 ``rope_scaling`` whose :func:`llama3_freq_factors` are ``divisors`` (None when
    none is found)."""
    f = np.asarray(divisors, dtype=np.float64)
    factor = float(f.max())
    dim = head_dim(config)
    if factor <= 1.0 or f.shape != (dim // 2,):
        return None
    wl = 2 * math.pi * float(config.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ones, full = np.isclose(f, 1.0, rtol=1e-5), np.isclose(f, factor, rtol=1e-5)
    mid = ~ones & ~full
    if mid.sum() >= 2:   # s = (old/wl - low) / (high - low), with s from 1/f = (1 - s)/factor + s
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(old_ctx / wl[mid], s, 1)
        low = -b / a
        high = low + 1 / a
    elif ones.any() and full.any() and not mid.any():   # no blended pair: thresholds between the groups
        high = old_ctx / ((wl[ones].max() + wl[~ones].min()) / 2)
        low = old_ctx / ((wl[~full].max() + wl[full].min()) / 2)
    else:
        return None
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
          "original_max_position_embeddings": int(old_ctx)}
    if not (0 < low < high) or not np.allclose(llama3_freq_factors({**config, "rope_scaling": rs}), f, rtol=1e-4):
        return None
    return rs


def from_gguf(meta: dict, arch: str, cfg: dict, tensors) -> None:
    if "rope_freqs.weight" in tensors:
        rs = llama3_from_factors(np.asarray(tensors["rope_freqs.weight"].data), cfg) \
            if isinstance(tensors, dict) else None
        if rs is None:
            raise UserError("this GGUF's rope_freqs (llama3-style rope scaling) match no llama3 rope parameters; "
                            "convert the original Hugging Face directory instead")
        cfg["rope_scaling"] = rs
        return
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if not (isinstance(factor, (int, float)) and factor > 0):
            raise UserError(f"GGUF metadata: linear rope scaling with factor {factor!r}; the file is corrupt "
                            "or incomplete: download it again")
        cfg["rope_scaling"] = {"type": "linear", "factor": float(factor)}


def check(config: dict) -> None:
    if rope_type(config) == "llama3":
        rs = config["rope_scaling"]
        if not isinstance(rs.get("factor"), (int, float)):
            raise UserError("config.json: llama3 rope_scaling lacks 'factor'; fix or re-download config.json")


LLAMA = Arch("llama", ("llama", "mistral"), "llama", permute_qk=True, check=check, export_check=export_check,
             write_meta=write_meta, extra_tensors=extra_tensors, from_gguf=from_gguf,
             gguf_extra=("rope_freqs.weight",))
ARCHS = [LLAMA]
