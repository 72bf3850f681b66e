"""Helpers for fuse/export tests: random adapters in training's format, cached conversions,
MLX and llama.cpp logits / greedy continuations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
ALL = ATTN + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROMPTS = ["The capital of France is", "SELECT name FROM users WHERE", "Once upon a time, there was",
           "def fibonacci(n):"]
_CACHE: dict = {}


def write_adapter(out: Path, model_dir: Path, targets=ATTN, rank: int = 8, alpha: float = 16.0,
                  seed: int = 0, b_std: float = 0.05, layers=None) -> Path:
    """A random LoRA adapter in training's format (nonzero lora_b) for the model at model_dir."""
    import mlx.core as mx

    from mlx_qlora.model.model_io import load

    cfg = json.loads((model_dir / "config.json").read_text())
    model, _ = load(model_dir, lazy=True)
    rng = np.random.default_rng(seed)
    n_layers = cfg["num_hidden_layers"]
    layers = list(range(n_layers)) if layers is None else layers
    modules = dict(model.named_modules())
    tensors = {}
    for i in layers:
        for t in targets:
            path = f"model.layers.{i}.{t}"
            m = modules[path]
            out_dim, in_dim = m.weight.shape[0], m.weight.shape[1] * (32 // m.bits if hasattr(m, "bits") else 1)
            tensors[f"{path}.lora_a"] = mx.array(rng.normal(0, 1 / np.sqrt(in_dim), (in_dim, rank)).astype(np.float32))
            tensors[f"{path}.lora_b"] = mx.array(rng.normal(0, b_std, (rank, out_dim)).astype(np.float32))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    keys = sorted({t for t in targets})
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": len(layers),
        "lora_parameters": {"rank": rank, "scale": alpha / rank, "dropout": 0.0, "keys": keys},
        "base_model": str(model_dir), "rank": rank, "alpha": alpha, "scale": alpha / rank,
        "use_rslora": False, "use_dora": False, "target_modules": keys, "layers": layers, "format_version": 1}))
    return out


def converted(tmp_path_factory, hf_dir: Path, name: str, **kw) -> Path:
    """HF dir -> MLX dir, once per session per conversion (kw: quantize, q_group_size, q_bits,
    dtype): modules asking for the same conversion under other names share it (tests only read
    it); ``name`` labels the directory of the first."""
    key = (str(hf_dir), tuple(sorted(kw.items())))
    if key not in _CACHE:
        from mlx_qlora.model.convert import ConvertConfig, run_convert

        out = tmp_path_factory.mktemp(name) / "model"
        run_convert(ConvertConfig(source=str(hf_dir) if hf_dir else None, out_dir=str(out), **kw))
        _CACHE[key] = out
    return _CACHE[key]


def mlx_model(model_dir: Path, adapter_dir: Path | None = None):
    from mlx_qlora.train.adapter_files import read_adapter
    from mlx_qlora.export.fuse import attach_adapter
    from mlx_qlora.model.model_io import load

    import mlx.core as mx

    # exactly the dequantized weights in fp32: the same math as quantized_matmul, several times
    # faster on CPU (MLX's CPU quantized_matmul is naive)
    model, tok = load(model_dir, dtype=mx.float32, dequantize=True)
    if adapter_dir is not None:
        attach_adapter(model, read_adapter(adapter_dir))
    return model, tok


def mlx_logits(model, tokens: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def mlx_greedy(model, tokens: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def llama(gguf_path: Path, lora: Path | None = None, vocab_only: bool = False):
    from mlx_qlora.model.llama_load import open_llama

    return open_llama(gguf_path, lora_path=str(lora) if lora else None, n_ctx=256,
                 logits_all=True, n_threads=2, n_batch=256, verbose=False, vocab_only=vocab_only)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm, tokens: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out

