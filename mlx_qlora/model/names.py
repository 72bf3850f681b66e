"""Tensor-name and config-key tables: Hugging Face / mlx-lm  <->  GGUF (llama.cpp).

One table serves both directions (convert reads GGUF, export writes it). mlx-lm's llama and
qwen2 modules use the Hugging Face names, so "HF name" and "MLX name" are the same string here.
"""
from __future__ import annotations

import re

# mlx-lm module path  ->  GGUF tensor base name ({bid} = block index). Suffixes (.weight, .bias,
# and MLX's quantization .scales/.biases) are carried over unchanged.
TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}

SUFFIXES = ("weight", "bias", "scales", "biases")

# GGUF general.architecture -> mlx-lm model_type. Mistral, TinyLlama and SmolLM2 GGUFs all say
# "llama"; qwen2 adds q/k/v biases and uses NEOX rope (no Q/K row permutation in the file).
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}

# HF config model_type values we convert (mlx-lm maps "mistral" onto its llama module).
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Which GGUF architectures store Q/K rows permuted for llama.cpp's interleaved ("normal") rope.
PERMUTED_QK = {"llama": True, "qwen2": False}

# GGUF metadata key (after "{arch}.") -> HF/mlx-lm config.json key.
CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
        suffix = "|".join(SUFFIXES)
        out.append((re.compile(rf"^{pattern}\.(?P<suffix>{suffix})$"), dst))
    return out


_TO_GGUF = _compile(TENSOR_NAMES)
_TO_MLX = _compile({v: k for k, v in TENSOR_NAMES.items()})


def _map(name: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            base = template.replace("{bid}", m.groupdict().get("bid") or "")
            return f"{base}.{m.group('suffix')}"
    return None


def mlx_to_gguf(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (None if unknown)."""
    return _map(name, _TO_GGUF)


def gguf_to_mlx(name: str) -> str | None:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales' (None if unknown)."""
    return _map(name, _TO_MLX)
