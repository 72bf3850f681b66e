"""IBM Granite 3.x: llama blocks with four multipliers - embeddings, residual branches, the
attention scale (instead of 1/sqrt(head_dim)) and a divisor on the logits. llama.cpp's granite
architecture reads them as ``embedding_scale``, ``residual_scale``, ``attention.scale`` and
``logit_scale``; its converter permutes Q/K like llama's.
"""
from __future__ import annotations

from . import Arch
from .llama import export_check, from_gguf as rope_from_gguf, write_meta as rope_meta

# config.json key -> gguf-py writer method (the GGUF key "granite.<...>")
MULTIPLIERS = {"embedding_multiplier": "add_embedding_scale", "residual_multiplier": "add_residual_scale",
               "attention_multiplier": "add_attention_scale", "logits_scaling": "add_logit_scale"}
GGUF_KEYS = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
             "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}


def write_meta(w, cfg: dict) -> None:
    for key, method in MULTIPLIERS.items():
        getattr(w, method)(float(cfg[key]))
    rope_meta(w, cfg)


def from_gguf(meta: dict, arch: str, cfg: dict, tensors: set) -> None:
    for key, gkey in GGUF_KEYS.items():
        cfg[key] = float(meta.get(f"{arch}.{gkey}", 1.0))
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors   # mlx-lm's granite needs both flags
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    rope_from_gguf(meta, arch, cfg, tensors)


ARCHS = [Arch("granite", ("granite",), "granite", permute_qk=True, required=tuple(MULTIPLIERS),
              export_check=export_check, write_meta=write_meta, from_gguf=from_gguf)]
