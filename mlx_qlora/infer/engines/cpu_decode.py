"""Rewrite an mlx-lm model for fast decoding on MLX's CPU backend.

Measured on the 2-core x86 dev box (OpenBLAS bound by ``mlx_qlora.model.blas``):
- ``mx.quantized_matmul`` on CPU is a naive loop: stock mlx-lm decodes SmolLM2 Q4 at ~7 tok/s.
- fp32 ``x @ W.T`` with one row goes through sgemm with a transposed B and is slow for the
  ~(1536, 576) matrices of a small model; ``W @ x.T`` is a plain matrix-vector product, ~7x faster.

So: dequantize every quantized linear/embedding to fp32 once (SmolLM2-135M: ~70 MB -> ~540 MB)
and compute linears as ``(W @ x.T).T`` when there is a single row. Prompts (many rows) keep
``x @ W.T``, which is a proper sgemm. LoRA wrappers are kept around the rewritten base layers.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GemvLinear(nn.Module):
    """An fp32 linear whose one-row products run as matrix-vector (``W @ x``)."""

    def __init__(self, weight: mx.array, bias: mx.array | None):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias

    def __call__(self, x):
        w = self.weight
        if x.size == x.shape[-1]:  # one row: (…, 1, in) -> W @ x
            y = (w @ x.reshape(-1, 1)).reshape(*x.shape[:-1], w.shape[0])
        else:
            y = x @ w.T
        if "bias" in self:
            y = y + self.bias
        return y


def _fp32_weight(layer) -> mx.array:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                          bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    else:
        w = layer.weight
    return w.astype(mx.float32)


class GemvEmbedding(nn.Embedding):
    """An fp32 embedding whose tied output projection (``as_linear``) is also a gemv."""

    def as_linear(self, x):
        if x.size == x.shape[-1]:
            return (self.weight @ x.reshape(-1, 1)).reshape(*x.shape[:-1], self.weight.shape[0])
        return x @ self.weight.T


def _convert(layer):
    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        bias = layer.get("bias")
        return GemvLinear(_fp32_weight(layer), None if bias is None else bias.astype(mx.float32))
    if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        emb = GemvEmbedding(1, 1)
        emb.weight = _fp32_weight(layer)
        return emb
    return None


def prepare(model: nn.Module) -> nn.Module:
    """In place: fp32 everywhere, linears as GemvLinear (LoRA wrappers keep wrapping them)."""
    from mlx.utils import tree_map, tree_unflatten

    swaps = [(path, new) for path, m in model.named_modules() if (new := _convert(m)) is not None]
    model.update_modules(tree_unflatten(swaps))
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    mx.eval(model.parameters())
    return model
