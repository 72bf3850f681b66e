"""CPU QLoRA step time per architecture family: the NumPy/BLAS engine against MLX autodiff (the
fallback every family has), side by side in one process on the same model and batches.

Each family gets random weights at one shape (hidden 576, 8 layers, 9 heads / 3 KV heads,
intermediate 1536, vocab 4096: SmolLM2-135M's block width, fewer layers), quantized 4-bit group
64, LoRA rank 8 on every linear of every layer; a batch of 4 rows of 256 random tokens, all in the
loss. ``--warmup`` steps, then the median of ``--steps`` timed loss-and-gradient evaluations for
each path. Families the engine does not cover print the one line training prints.

    flock /tmp/cpu-bench.lock python bench/train_families.py [--families qwen3,phi3] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx_qlora  # noqa: E402, F401  (BLAS before mlx.core)

SHAPE = dict(hidden_size=576, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=2048, tie_word_embeddings=True)
FAMILIES = {
    "llama": {}, "qwen3": dict(head_dim=64), "phi3": dict(partial_rotary_factor=0.75),
    "smollm3": {}, "olmo2": {},
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                    logits_scaling=4.0, attention_bias=False, mlp_bias=False),
    "gemma3_text": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=512),
}
LLAMA3 = dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})


def build(family: str):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    from mlx_qlora.train.config import LoraConfig
    from mlx_qlora.train.lora import apply_lora

    mtype = "llama" if family == "llama3" else family
    cfg = {**SHAPE, **FAMILIES.get(family, LLAMA3 if family == "llama3" else {}), "model_type": mtype}
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    mx.random.seed(0)
    nn.quantize(model, group_size=64, bits=4)
    apply_lora(model, LoraConfig(rank=8, alpha=16.0))
    mx.eval(model.parameters())
    return model


def batch(vocab: int, rows: int = 4, seq: int = 256):
    import numpy as np

    from mlx_qlora.train.data import Example, collate

    rng = np.random.default_rng(0)
    return collate([Example(rng.integers(1, vocab, seq).astype(np.int32), np.ones(seq, bool)) for _ in range(rows)])


def time_path(model, engine: bool, b, warmup: int, steps: int) -> tuple[float | None, str]:
    from mlx_qlora.train.loop import make_step_fns, prepare_model

    prepare_model(model)   # as train() does: fp32 floats, the CPU fast-path kernels
    said = []
    fns = make_step_fns(model, use_cpu_engine=engine, say=said.append)
    if engine and said and "MLX autodiff" in said[0]:
        return None, said[0]
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fns.grad(b, (0, i, 0))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), said[0] if said else ""


def main() -> None:
    import mlx.core as mx

    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="llama,llama3,qwen3,phi3,smollm3,olmo2,granite,gemma3_text")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"load average {os.getloadavg()[0]:.2f}; batch 4 x 256 tokens, rank 8 all-linear, 4-bit; median of "
          f"{args.steps} steps")
    print(f"{'family':<12} {'NumPy engine s/step':>20} {'MLX autodiff s/step':>20} {'speed-up':>9}")
    for fam in args.families.split(","):
        b = batch(SHAPE["vocab_size"])
        eng, line = time_path(build(fam), True, b, args.warmup, args.steps)
        auto, _ = time_path(build(fam), False, b, args.warmup, args.steps)
        if eng is None:
            print(f"{fam:<12} {'-':>20} {auto:>20.3f} {'-':>9}   {line}")
        else:
            print(f"{fam:<12} {eng:>20.3f} {auto:>20.3f} {auto / eng:>8.2f}x")


if __name__ == "__main__":
    main()
