"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (llama.cpp keeps them
fused too: ``attn_qkv`` and a double-width ``ffn_up``), NEOX rope over ``partial_rotary_factor``
of each head (Phi-4-mini: 0.75), so no Q/K permutation.
"""
from __future__ import annotations

from ...errors import UserError
from . import Arch
from .llama import export_check as rope_check, from_gguf as rope_from_gguf, write_meta as rope_meta


def normalize(cfg: dict) -> dict:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "partial_rotary_factor" in rp:
        cfg.setdefault("partial_rotary_factor", rp["partial_rotary_factor"])
    return cfg


def rope_dims(cfg: dict) -> int:
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hd * float(cfg.get("partial_rotary_factor") or 1.0))


def check(cfg: dict) -> None:
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind not in (None, "default"):
        raise UserError(f"phi3 rope scaling {kind!r} is not supported yet (mlx-lm applies longrope's long factors "
                        "at every length, Hugging Face the short ones below original_max_position_embeddings)")


def write_meta(w, cfg: dict) -> None:
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    rope_meta(w, cfg)


def from_gguf(meta: dict, arch: str, cfg: dict, tensors: set) -> None:
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    rd = meta.get(f"{arch}.rope.dimension_count", hd)
    cfg.pop("head_dim", None)   # phi3's head is hidden/heads; a smaller rope count is partial rotary
    if rd != hd:
        cfg["partial_rotary_factor"] = rd / hd
    rope_from_gguf(meta, arch, cfg, tensors)


ARCHS = [Arch("phi3", ("phi3",), "phi3", normalize=normalize, check=check, export_check=rope_check,
              write_meta=write_meta, from_gguf=from_gguf, rope_dims=rope_dims,
              notes=("mlx-lm attends globally: exact up to sliding_window tokens",))]
