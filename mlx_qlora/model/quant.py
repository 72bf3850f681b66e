"""Affine group quantization: MLX <-> GGUF block facts, bits per weight, round-trip error.

MLX affine quantization stores, per group of ``group_size`` consecutive input weights, a scale
and a bias: ``w = scale * q + bias`` with ``q`` an unsigned ``bits``-bit integer. Three GGUF
block types are exactly that with group size 32, so they convert without touching a value:

    Q4_1: w = d*q + m          -> bits 4, scale d, bias m
    Q4_0: w = d*(q - 8)        -> bits 4, scale d, bias -8d
    Q8_0: w = d*(q_signed)     -> bits 8, scale d, bias -128d   (q = q_signed + 128)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# GGUF tensor type name -> (bits, group size) of the MLX affine quantization it equals exactly.
GGUF_EXACT = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}
GGUF_FLOAT = ("F32", "F16", "BF16")

ALLOWED_BITS = (2, 3, 4, 6, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128)


def permute_qk(w, n_head: int):
    """HF row order -> llama.cpp's (interleaved rope pairs), as its converter does.

    Rows of each head are ``[x0..x(d/2-1), y0..y(d/2-1)]`` in HF; llama.cpp wants
    ``[x0, y0, x1, y1, ...]``. Works on any array whose first axis is rows (weights, MLX
    scales/biases, bias vectors, LoRA B).
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w, n_head: int):
    """Inverse of :func:`permute_qk`: llama.cpp row order -> HF."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass
class QuantStats:
    """Accumulates the relative RMS error ||W_hat - W|| / ||W|| over all quantized tensors."""

    err_sq: float = 0.0
    ref_sq: float = 0.0
    tensors: int = 0

    def add(self, w, w_hat) -> None:
        w = np.asarray(w, dtype=np.float64)
        d = np.asarray(w_hat, dtype=np.float64) - w
        self.err_sq += float((d * d).sum())
        self.ref_sq += float((w * w).sum())
        self.tensors += 1

    @property
    def rel_rms(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def quantize(w, bits: int, group_size: int, stats: QuantStats | None = None):
    """MLX affine quantization of a float matrix; records its round-trip error in ``stats``."""
    import mlx.core as mx

    w = mx.array(w) if not isinstance(w, mx.array) else w
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    if stats is not None:
        w_hat = mx.dequantize(q, scales, biases, group_size=group_size, bits=bits)
        stats.add(np.array(w.astype(mx.float32)), np.array(w_hat.astype(mx.float32)))
    return q, scales, biases


def n_params(weights: dict, bits_of: dict[str, int]) -> int:
    """Number of model parameters behind ``weights``; ``bits_of[module]`` for quantized ones."""
    total = 0
    for name, a in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.rsplit(".", 1)[0]
        total += a.size * 32 // bits_of[module] if module in bits_of and name.endswith(".weight") else a.size
    return total


def bits_per_weight(weights: dict, bits_of: dict[str, int]) -> float:
    """Stored bits per parameter, scales and biases included (mlx-lm reports the same figure)."""
    stored = sum(a.nbytes for a in weights.values()) * 8
    return stored / max(n_params(weights, bits_of), 1)
