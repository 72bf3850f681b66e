"""Gemma 2 and Gemma 3 (text): RMSNorm as ``x * (1 + w)``, GeGLU, embeddings scaled by
sqrt(hidden), norms before and after attention and MLP, sliding-window and global layers.

llama.cpp stores the norms as ``1 + w`` (its converter adds one to every ``*norm.weight``), uses
NEOX rope (no Q/K permutation), and fixes some things in code rather than metadata: the
sliding/global pattern (every 2nd layer global in Gemma 2, every 6th in Gemma 3), Gemma 3's
local rope base (10000), and the attention scale (1/sqrt(head_dim), except the 27B models:
1/sqrt(hidden/heads)). A config that differs from those is refused at export, one line.

mlx-lm's gemma2 attends globally in every layer: the same as Hugging Face for sequences up to
``sliding_window`` (4096 in Gemma 2), longer ones differ.
"""
from __future__ import annotations

from ...errors import UserError
from . import Arch
from .llama import export_check as rope_check, from_gguf as rope_from_gguf, write_meta as rope_meta

# layer count of the 27B models, whose attention scale llama.cpp takes from hidden/heads
LAYERS_27B = {"gemma2": 46, "gemma3": 62}
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}   # llama.cpp: every Nth layer global
GEMMA3_LOCAL_BASE = 10000.0


def _layer_pattern(layer_types) -> int | None:
    """N when layer i is global exactly when (i + 1) % N == 0 (None if no N fits)."""
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(layer_types)):
            return p
    return None


def normalize3(cfg: dict) -> dict:
    """transformers 5 keeps rope settings per layer type and a ``layer_types`` list; mlx-lm's
    gemma3_text reads rope_theta, rope_local_base_freq and sliding_window_pattern."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        full, local = rp["full_attention"], rp.get("sliding_attention") or {}
        cfg.setdefault("rope_theta", full.get("rope_theta", 1e6))
        if "rope_theta" in local:
            cfg.setdefault("rope_local_base_freq", local["rope_theta"])
        if full.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        cfg.pop("rope_parameters")
    lt = cfg.get("layer_types")
    if isinstance(lt, list) and lt and "sliding_window_pattern" not in cfg:
        p = _layer_pattern(lt)
        if p is not None:
            cfg["sliding_window_pattern"] = p
    return cfg


def check3(cfg: dict) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UserError(f"config.json sets {key}={cfg[key]}; Gemma 3 models have none and mlx-lm's gemma3_text "
                            "does not apply it: fix config.json")
    lt = cfg.get("layer_types")
    if isinstance(lt, list) and lt and _layer_pattern(lt) is None:
        raise UserError("config.json: layer_types is not 'every Nth layer global', the pattern mlx-lm's "
                        "gemma3_text models; not supported")


def _scale_check(cfg: dict, arch: str):
    hd = int(cfg["head_dim"])
    q = cfg.get("query_pre_attn_scalar", hd)
    big = cfg["num_hidden_layers"] == LAYERS_27B[arch]
    want = cfg["hidden_size"] / cfg["num_attention_heads"] if big else hd
    if q != want:
        return (f"query_pre_attn_scalar {q} is not {want:g}, the attention scale llama.cpp hard-codes for "
                f"this {arch} size")
    return None


def export_check2(cfg: dict):
    return _scale_check(cfg, "gemma2") or rope_check(cfg)


def export_check3(cfg: dict):
    p = cfg.get("sliding_window_pattern", SWA_PATTERN["gemma3"])
    if p != SWA_PATTERN["gemma3"]:
        return f"sliding_window_pattern {p} is not 6, the pattern llama.cpp hard-codes for gemma3"
    if float(cfg.get("rope_local_base_freq", GEMMA3_LOCAL_BASE)) != GEMMA3_LOCAL_BASE:
        return f"rope_local_base_freq {cfg['rope_local_base_freq']} is not 10000, which llama.cpp hard-codes"
    return _scale_check(cfg, "gemma3") or rope_check(cfg)


def meta2(w, cfg: dict) -> None:
    if cfg.get("attn_logit_softcapping") is not None:
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    w.add_sliding_window(int(cfg.get("sliding_window") or 4096))


def meta3(w, cfg: dict) -> None:
    w.add_sliding_window(int(cfg.get("sliding_window") or 512))
    rope_meta(w, cfg)


def _scalar(cfg: dict, arch: str) -> int:
    """llama.cpp's attention scale as Gemma's query_pre_attn_scalar (an integer in every config)."""
    big = cfg["num_hidden_layers"] == LAYERS_27B[arch]
    return cfg["hidden_size"] // cfg["num_attention_heads"] if big else int(cfg["head_dim"])


def from_gguf2(meta: dict, arch: str, cfg: dict, tensors: set) -> None:
    cfg["attn_logit_softcapping"] = meta.get(f"{arch}.attn_logit_softcapping")
    cfg["final_logit_softcapping"] = meta.get(f"{arch}.final_logit_softcapping")
    cfg["sliding_window"] = meta.get(f"{arch}.attention.sliding_window", 4096)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["query_pre_attn_scalar"] = _scalar(cfg, "gemma2")


def from_gguf3(meta: dict, arch: str, cfg: dict, tensors: set) -> None:
    cfg["sliding_window"] = meta.get(f"{arch}.attention.sliding_window", 512)
    cfg["sliding_window_pattern"] = SWA_PATTERN["gemma3"]
    cfg["rope_local_base_freq"] = GEMMA3_LOCAL_BASE
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["query_pre_attn_scalar"] = _scalar(cfg, "gemma3")
    rope_from_gguf(meta, arch, cfg, tensors)


GEMMA2 = Arch("gemma2", ("gemma2",), "gemma2", norm_offset=1.0, required=("head_dim",),
              export_check=export_check2, write_meta=meta2, from_gguf=from_gguf2)
GEMMA3 = Arch("gemma3", ("gemma3_text",), "gemma3", norm_offset=1.0, required=("head_dim",),
              normalize=normalize3, check=check3, export_check=export_check3, write_meta=meta3,
              from_gguf=from_gguf3)
ARCHS = [GEMMA2, GEMMA3]
