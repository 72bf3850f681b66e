"""Config-key table (Hugging Face / mlx-lm <-> GGUF) and tensor-name helpers.

Tensor names come from gguf-py's own per-architecture tables (archs.gguf_name); mlx-lm's
modules use the Hugging Face names, so "HF name" and "MLX name" are the same string here. One
table serves both directions (convert reads GGUF, export writes it).
"""
from __future__ import annotations

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


def mlx_to_gguf(name: str, model_type: str = "llama") -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (None if unknown), by
    gguf-py's table for the family of ``model_type``."""
    from . import archs

    return archs.gguf_name(archs.for_model_type(model_type), name)


def gguf_to_mlx(name: str, model_type: str = "llama") -> str | None:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales' for a llama-layout model
    (None if unknown). Readers of other families use archs.gguf_to_mlx_modules, which maps the
    names of the model itself (phi3's ffn_up is gate_up_proj there)."""
    import re

    hit = re.match(r"^blk\.(\d+)\.", name)
    bid = hit.group(1) if hit else "0"
    base, _, suffix = name.rpartition(".")
    for module in _LLAMA_MODULES:
        m = module.replace("{bid}", bid)
        if mlx_to_gguf(f"{m}.{suffix}", model_type) == name:
            return f"{m}.{suffix}"
    return None


_LLAMA_MODULES = ("model.embed_tokens", "model.norm", "lm_head") + tuple(
    f"model.layers.{{bid}}.{m}" for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                                           "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
