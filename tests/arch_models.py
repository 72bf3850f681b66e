"""Tiny random models of every supported family, built from transformers' own config and model
classes (no network): the reference the architecture tests compare MLX and llama.cpp against.

Each row sets what makes the family itself (Llama 3 rope scaling, Qwen3's explicit head_dim,
Gemma's soft-capping and sliding windows, Phi-4-mini's partial rotary and LongRoPE (short factors below 512 tokens), SmolLM3's no-rope
layers, Granite's multipliers) at values small enough to matter on a 64-wide model: Gemma 3 gets
6 layers and a 6-token window so both a sliding and a global layer see positions outside the
window; Gemma 2 keeps its window above the test lengths, as mlx-lm's gemma2 attends globally.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import tiny

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5)

# family -> (transformers config class, its keys)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=10.0, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                        num_hidden_layers=6)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.75, tie_word_embeddings=False)),
    "phi4mini": ("Phi3Config", dict(partial_rotary_factor=0.75, tie_word_embeddings=True, max_position_embeddings=2048,
                                    original_max_position_embeddings=512, rope_parameters={
                                        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                        "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                        "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True)),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                      logits_scaling=2.0, tie_word_embeddings=True)),
}
# families whose norms multiply by (1 + w): their random norm weights are drawn around 0
OFFSET_NORMS = ("gemma2", "gemma3")


def hf_config(family: str):
    import transformers

    cls_name, kw = FAMILIES[family]
    eos = tiny.tokenizer_json()["model"]["vocab"]["<|im_end|>"]
    pad = tiny.tokenizer_json()["model"]["vocab"]["<|endoftext|>"]
    return getattr(transformers, cls_name)(**{**COMMON, **kw, "vocab_size": tiny.vocab_size(),
                                              "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None})


def torch_model(hf_dir: Path):
    """The transformers model of a directory, fp32, eager attention (soft-capping included)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()


def write_family(path: Path, family: str, seed: int = 0) -> Path:
    """An HF directory (config.json, model.safetensors, tokenizer) of a tiny random ``family``
    model; weights drawn so logits are far from uniform (std ~ 1/sqrt(fan-in) matrices, unit
    embeddings, norms 1 +- 0.1)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("embed" in name or "lm_head" in name):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            elif "norm" in name:
                base = 0.0 if family in OFFSET_NORMS else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path), safe_serialization=True)
    tiny.write_tokenizer(path)
    return path


def prompts_tokens() -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tiny.tokenizer_json()))
    texts = ["The capital of France is", "SELECT name FROM users WHERE age > 30 AND",
             "Once upon a time, there was a little", "def fibonacci(n): return n if n < 2 else"]
    return [tok.encode(t).ids for t in texts]


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
