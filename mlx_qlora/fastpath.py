"""CPU fast path for QLoRA: the kernels that MLX's CPU backend runs slowly, rebuilt from fast ones.

On CPU, ``mx.quantized_matmul`` is a naive loop (~1-2 GFLOP/s) while ``mx.dequantize`` followed
by an fp32 BLAS matmul runs at ~50-90 GFLOP/s. ``dequant_matmul`` does exactly that inside an
``mx.custom_function`` whose vjp dequantizes again, so no fp32 copy of a frozen weight outlives
the matmul that needs it (memory stays at 4-bit size plus one layer's fp32 weight at a time).

``fused_cross_entropy`` computes the vocabulary projection, log-softmax and its gradient in row
chunks, only at the positions where the loss mask is on, and never keeps a (tokens, vocab)
logits array between forward and backward: the gradient w.r.t. the hidden states is formed in
the forward pass (the loss is the last op, so its cotangent is a scalar) and only scaled later.

On Metal and CUDA these are not used: ``quantized_matmul`` is fast there.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

# Rows of the (tokens, vocab) logits handled at once by the fused loss: 256 x 49,152 fp32 is
# 48 MiB, large enough that the matmul runs at full BLAS speed, small enough to stay cheap.
CE_CHUNK_ROWS = 256


_ENABLED = [True]


def on_cpu() -> bool:
    return _ENABLED[0] and mx.default_device().type == mx.DeviceType.cpu


@contextmanager
def disabled():
    """Run the plain MLX kernels (reference for parity tests and benchmarks)."""
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = True


def _dequantize(w, scales, biases, group_size: int, bits: int, mode: str):
    out = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return out if out.dtype == mx.float32 else out.astype(mx.float32)


@lru_cache(maxsize=None)
def _dequant_matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool):
    """One custom function per quantization layout (they are static, not traced, arguments)."""

    def unpack(args):
        if has_biases:
            return args
        w, scales = args
        return w, scales, None

    @mx.custom_function
    def f(x, *qargs):
        w, scales, biases = unpack(qargs)
        return x @ _dequantize(w, scales, biases, group_size, bits, mode).T

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, *qargs = primals
        w, scales, biases = unpack(qargs)
        dx = cotangent @ _dequantize(w, scales, biases, group_size, bits, mode)
        # The base weights are frozen: their cotangents are never consumed, and mx.zeros does
        # not reference the primal, so nothing keeps the packed or fp32 weight alive.
        return (dx.astype(x.dtype),) + tuple(mx.zeros(a.shape, a.dtype) for a in qargs)

    return f


def dequant_matmul(x: mx.array, q: nn.QuantizedLinear) -> mx.array:
    """``x @ W.T`` for a QuantizedLinear (bias not included), via dequantize + BLAS."""
    has_biases = getattr(q, "biases", None) is not None
    f = _dequant_matmul_fn(q.group_size, q.bits, getattr(q, "mode", "affine"), has_biases)
    args = (q.weight, q.scales, q.biases) if has_biases else (q.weight, q.scales)
    return f(x.astype(mx.float32), *args).astype(x.dtype)


def base_linear(linear: nn.Module, x: mx.array) -> mx.array:
    """Frozen base projection, using the fast path where it pays (quantized weights on CPU)."""
    if isinstance(linear, nn.QuantizedLinear) and on_cpu():
        y = dequant_matmul(x, linear)
        if "bias" in linear:
            y = y + linear["bias"]
        return y
    return nn.QuantizedLinear.__call__(linear, x) if isinstance(linear, nn.QuantizedLinear) else linear(x)


class FastQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose CPU forward/backward go through ``dequant_matmul``.

    Swapped in by changing ``__class__`` (see ``accelerate``), so parameter names, isinstance
    checks and fusing code see an ordinary QuantizedLinear.
    """

    def __call__(self, x):
        if on_cpu():
            return base_linear(self, x)
        return super().__call__(x)


def accelerate(model: nn.Module) -> int:
    """Route every QuantizedLinear of ``model`` through the CPU fast path; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = FastQuantizedLinear
            n += 1
    return n


def dense_weight(module: nn.Module) -> mx.array:
    """The (out, in) fp32 weight of a Linear / Embedding, dequantized when quantized."""
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return _dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                           module.bits, getattr(module, "mode", "affine"))
    w = module.weight
    return w if w.dtype == mx.float32 else w.astype(mx.float32)


def _chunk_loss(h, w, targets):
    """Per-row cross-entropy and softmax probabilities for one chunk of rows."""
    logits = h @ w.T                                       # (rows, vocab)
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = mx.exp(logits - m)
    s = mx.sum(e, axis=-1, keepdims=True)
    target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
    loss = (m + mx.log(s) - target_logit).squeeze(-1)
    return loss, e, s


@mx.custom_function
def _fused_ce(h, w, targets):
    losses, grads = [], []
    for start in range(0, h.shape[0], CE_CHUNK_ROWS):
        hc, tc = h[start:start + CE_CHUNK_ROWS], targets[start:start + CE_CHUNK_ROWS]
        loss, e, s = _chunk_loss(hc, w, tc)
        # d(sum loss)/d logits = softmax - onehot; push it through the projection right away.
        p = e * (1.0 / s)
        p = mx.put_along_axis(p, tc[:, None], mx.take_along_axis(p, tc[:, None], axis=-1) - 1.0, axis=-1)
        losses.append(loss)
        grads.append(p @ w)
    return mx.sum(mx.concatenate(losses)), mx.concatenate(grads)


@_fused_ce.vjp
def _fused_ce_vjp(primals, cotangents, outputs):
    h, w, targets = primals
    return (cotangents[0] * outputs[1], mx.zeros(w.shape, w.dtype), mx.zeros(targets.shape, targets.dtype))


def fused_cross_entropy(h: mx.array, head: nn.Module, targets: mx.array, with_grad: bool = True) -> mx.array:
    """Sum of token cross-entropies for hidden states ``h`` (rows, dim) against ``targets`` (rows,).

    ``head`` is the output projection (lm_head, or the tied embedding). With ``with_grad=False``
    (validation) the gradient is not formed, which halves the cost.
    """
    w = dense_weight(head)
    h = h.astype(mx.float32)
    if with_grad:
        return _fused_ce(h, w, targets)[0]
    total = mx.array(0.0)
    for start in range(0, h.shape[0], CE_CHUNK_ROWS):
        loss, _, _ = _chunk_loss(h[start:start + CE_CHUNK_ROWS], w, targets[start:start + CE_CHUNK_ROWS])
        total = total + loss.sum()
    return total


def plain_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Reference: sum of cross-entropies from full logits (rows, vocab)."""
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="sum")
