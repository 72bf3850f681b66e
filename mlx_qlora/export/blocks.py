"""MLX affine-quantized tensors -> GGUF block bytes, exactly where the math allows.

GGUF block layouts (32 weights per block, fp16 d/m, little-endian):

    Q4_1: d, m, qs[16]   w = d*q + m       qs[j] = q[j] | q[j+16] << 4
    Q4_0: d, qs[16]      w = d*(q - 8)     same nibble order as Q4_1
    Q8_0: d, qs[32]      w = d*qs          qs signed int8

MLX packs ``bits``-bit codes little-endian into uint32 words (code i of a row at bit
``bits*i``) and keeps one fp scale and bias per ``group_size`` weights. An MLX 4-bit group of
32*k weights is k Q4_1 blocks sharing (scale, bias): the codes are copied, only the nibble order
changes. Q4_0 and Q8_0 have no free bias, so they are exact only when ``bias == -8*scale`` /
``-128*scale`` (true for models converted from such GGUF files). Anything else is dequantized and
re-quantized with gguf-py, and the error is measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --type name -> (GGML type name, the MLX (bits, bias multiple of scale) it equals exactly;
# bias multiple None = free bias).
BLOCK_TYPES = {"q4_1": ("Q4_1", 4, None), "q4_0": ("Q4_0", 4, -8.0), "q8_0": ("Q8_0", 8, -128.0)}
FLOAT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# Which block types are at least as precise as the requested one (an exact copy in a more precise
# type beats re-quantizing into the requested one: SmolLM2's Q8_0 embedding stays Q8_0 in a q4_1 file).
AT_LEAST = {"q4_1": ("q4_1", "q8_0"), "q4_0": ("q4_0", "q4_1", "q8_0"), "q8_0": ("q8_0",)}
BLOCK = 32  # weights per GGUF block for all three types


def unpack_codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """MLX packed uint32 (rows, cols*bits/32) -> uint8 codes (rows, cols)."""
    per_word = 32 // bits
    words = np.ascontiguousarray(wq).view(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`unpack_codes`: uint8 codes (rows, cols) -> MLX uint32 words."""
    per_word = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    return (c << shifts).sum(axis=-1, dtype=np.uint32)


def _per_block(a: np.ndarray, group_size: int) -> np.ndarray:
    """Per-group values (rows, cols/group) -> per-32-block values (rows, cols/32)."""
    return np.repeat(a, group_size // BLOCK, axis=1)


def fp16_exact(a: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a.astype(np.float32)))


@dataclass
class Packed:
    """One GGUF tensor: raw bytes (rows, bytes per row) or a float array, and how it was made."""

    data: np.ndarray
    ggml_type: str
    how: str               # "exact" | "fp16 scales" | "requantized" | "float"
    rel_err: float = 0.0   # ||W_gguf - W_mlx|| / ||W_mlx||, 0 when exact


def exact_block_type(bits: int, group_size: int, scales: np.ndarray, biases: np.ndarray,
                     allowed: tuple[str, ...]) -> str | None:
    """The first --type name in ``allowed`` whose blocks equal this MLX quantization, else None."""
    if group_size % BLOCK:
        return None
    for name in allowed:
        _, tbits, bias_mult = BLOCK_TYPES[name]
        if tbits != bits:
            continue
        if bias_mult is None or np.array_equal(biases.astype(np.float32), (bias_mult * scales).astype(np.float32)):
            return name
    return None


def mlx_to_blocks(name: str, wq: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                  group_size: int) -> np.ndarray:
    """MLX (codes, scales, biases) -> GGUF block bytes (rows, blocks*bytes) of block type ``name``,
    with d/m rounded to fp16 (exact when they already are fp16 values)."""
    ggml, bits, _ = BLOCK_TYPES[name]
    codes = unpack_codes(wq, bits)
    rows, cols = codes.shape
    nb = cols // BLOCK
    d = _per_block(scales.astype(np.float32), group_size).astype(np.float16).reshape(rows, nb, 1)
    q = codes.reshape(rows, nb, BLOCK)
    parts = [d.view(np.uint8)]
    if ggml == "Q4_1":
        m = _per_block(biases.astype(np.float32), group_size).astype(np.float16).reshape(rows, nb, 1)
        parts.append(m.view(np.uint8))
    if bits == 4:
        parts.append(q[..., :16] | (q[..., 16:] << 4))
    else:  # Q8_0 stores q - 128 as signed bytes
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def dequantize_mlx(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                   group_size: int) -> np.ndarray:
    """Float32 weights of an MLX affine-quantized tensor (numpy, no MLX needed)."""
    codes = unpack_codes(wq, bits).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    return codes * s + b


def rel_err(w: np.ndarray, w_hat: np.ndarray) -> float:
    w = w.astype(np.float64)
    den = float(np.sqrt((w * w).sum()))
    return float(np.sqrt(((w_hat.astype(np.float64) - w) ** 2).sum())) / den if den else 0.0


def blocks_to_float(data: np.ndarray, ggml_type: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(data, GGMLQuantizationType[ggml_type]).astype(np.float32)


def quantized_tensor(name: str, wq, scales, biases, bits: int, group_size: int, type_name: str) -> Packed:
    """An MLX-quantized weight as a GGUF tensor of --type ``type_name`` (exact copy where possible)."""
    if type_name in FLOAT_TYPES:
        return float_tensor(dequantize_mlx(wq, scales, biases, bits, group_size), type_name)
    exact = exact_block_type(bits, group_size, scales, biases, AT_LEAST[type_name])
    if exact is not None:
        data = mlx_to_blocks(exact, wq, scales, biases, group_size)
        ggml = BLOCK_TYPES[exact][0]
        if fp16_exact(scales) and fp16_exact(biases):
            return Packed(data, ggml, "exact")
        w = dequantize_mlx(wq, scales, biases, bits, group_size)
        return Packed(data, ggml, "fp16 scales", rel_err(w, blocks_to_float(data, ggml)))
    return float_tensor(dequantize_mlx(wq, scales, biases, bits, group_size), type_name)


def float_tensor(w: np.ndarray, type_name: str) -> Packed:
    """A float tensor as --type ``type_name``; vectors and rows not a multiple of 32 stay F32
    (llama.cpp wants norms and biases in F32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2 or type_name == "f32":
        return Packed(w, "F32", "float")
    if type_name == "f16":
        return Packed(w.astype(np.float16), "F16", "float", rel_err(w, w.astype(np.float16)))
    if type_name == "bf16":
        data = quantize(w, GGMLQuantizationType.BF16)
        return Packed(data, "BF16", "float", rel_err(w, blocks_to_float(data, "BF16")))
    if w.shape[-1] % BLOCK:
        return Packed(w.astype(np.float16), "F16", "float", rel_err(w, w.astype(np.float16)))
    ggml = BLOCK_TYPES[type_name][0]
    data = quantize(w, GGMLQuantizationType[ggml])
    return Packed(data, ggml, "requantized", rel_err(w, blocks_to_float(data, ggml)))
