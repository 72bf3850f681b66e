"""Print the README's "fits a 16 GiB Mac" table: this project's memory planner
(``mlx_qlora.train.memory_plan.estimate_qlora_bytes``) on the published shapes of one model per
family and size, for a QLoRA step at batch 1 x 2048 tokens, rank 16 on every linear, 4-bit group
64, fp16 scales (Metal), gradient checkpointing on. Estimates, not measurements.

    python scripts/mac16_plan.py
"""
from __future__ import annotations

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
from mlx_qlora.train.memory_plan import estimate_qlora_bytes

# (model, recipe, config.json keys as published on the Hugging Face hub)
SHAPES = [
    ("meta-llama/Llama-3.2-1B-Instruct", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)),
    ("allenai/OLMo-2-0425-1B-Instruct", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="olmo2", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
          intermediate_size=8192, vocab_size=100352, tie_word_embeddings=False)),
    ("Qwen/Qwen3-1.7B", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
          head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True)),
    ("ibm-granite/granite-3.3-2b-instruct", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="granite", hidden_size=2048, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=49159, tie_word_embeddings=True, embedding_multiplier=12.0,
          residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0,
          attention_bias=False, mlp_bias=False)),
    ("google/gemma-2-2b-it", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
          head_dim=256, intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256)),
    ("google/gemma-3-1b-it", "recipes/mac16-1b-qlora.yaml",
     dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
          head_dim=256, intermediate_size=6912, vocab_size=262144, query_pre_attn_scalar=256, sliding_window=512)),
    ("meta-llama/Llama-3.2-3B-Instruct", "recipes/mac16-4b-qlora.yaml",
     dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)),
    ("HuggingFaceTB/SmolLM3-3B", "recipes/mac16-4b-qlora.yaml",
     dict(model_type="smollm3", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
          intermediate_size=11008, vocab_size=128256, tie_word_embeddings=True)),
    ("microsoft/Phi-4-mini-instruct", "recipes/mac16-4b-qlora.yaml",
     dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75,
          rms_norm_eps=1e-5)),
    ("Qwen/Qwen3-4B", "recipes/mac16-4b-qlora.yaml",
     dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
          head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True)),
    ("Qwen/Qwen3-8B", "recipes/llama3-8b-qlora.yaml",
     dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
          head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False)),
    ("meta-llama/Llama-3.1-8B-Instruct", "recipes/llama3-8b-qlora.yaml",
     dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
]
COMMON = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192)
GIB = 2 ** 30
MAC16_GPU_GIB = 16 * 2 / 3   # macOS lets the GPU wire about two thirds of a 16 GB Mac's memory


def table(batch: int = 1, seq: int = 2048) -> str:
    rows = ["| model | recipe | 4-bit weights | adapter + AdamW + loss chunk | activations | total (estimate) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, recipe, shape in SHAPES:
        e = estimate_qlora_bytes({**COMMON, **shape}, batch, seq)
        fits = "" if e["total"] / GIB < MAC16_GPU_GIB else " (over ~10.7)"
        rows.append(f"| {name} | `{recipe}` | {e['weights'] / GIB:.1f} GiB | {e['adapter_and_optimizer'] / GIB:.1f} GiB | "
                    f"{e['activations'] / GIB:.1f} GiB | **{e['total'] / GIB:.1f} GiB**{fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
