"""CPU fast path for QLoRA: the kernels that MLX's CPU backend runs slowly, rebuilt from fast ones.

On CPU, ``mx.quantized_matmul`` is a naive loop (~1-2 GFLOP/s) while ``mx.dequantize`` followed
by an fp32 BLAS matmul runs at ~50-90 GFLOP/s. ``dequant_matmul`` does exactly that inside an
``mx.custom_function`` whose vjp dequantizes again, so no fp32 copy of a frozen weight outlives
the matmul that needs it (memory stays at 4-bit size plus one layer's fp32 weight at a time).

``fused_cross_entropy`` computes the vocabulary projection, log-softmax and its gradient in row
chunks, only at the positions where the loss mask is on, and never keeps a (tokens, vocab)
logits array between forward and backward: the gradient w.r.t. the hidden states is formed in
the forward pass (the loss is the last op, so its cotangent is a scalar) and only scaled later.

On Metal and CUDA the CPU kernels are not used; ``base_linear`` and ``swiglu`` are the dispatch
points the GPU step shares (``dequant_gemm``'s products, ``lean_swiglu``; see ``mlx_step``).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import dequant_gemm, numpy_kernels

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


def detached(a: mx.array) -> mx.array:
    """``a`` evaluated and cut from its graph (a copy that has no inputs).

    Inside a custom function's forward the graph is never differentiated (the vjp is ours), but
    MLX keeps every intermediate of an array evaluated during a transformation alive until the
    step ends, e.g. one fp32 dequantized weight per layer. Evaluating and copying the (small)
    output lets those intermediates go as soon as the forward is done.
    """
    mx.eval(a)
    return mx.array(np.asarray(a)) if a.dtype == mx.float32 else a


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
        return detached(x @ _dequantize(w, scales, biases, group_size, bits, mode).T)

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
    """Frozen base projection, using the fast path where it pays: on CPU dequantize + fp32 BLAS
    (evaluated eagerly), in a GPU step with ``dequant_gemm`` on dequantize + GEMM (traced)."""
    if not isinstance(linear, nn.QuantizedLinear):
        return linear(x)
    if on_cpu():
        y = dequant_matmul(x, linear)
    elif dequant_gemm.applies(x):
        y = dequant_gemm.matmul(x, linear)
    else:
        return nn.QuantizedLinear.__call__(linear, x)
    return y + linear["bias"] if "bias" in linear else y


class FastQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose CPU forward/backward go through ``dequant_matmul`` (and, in a GPU
    step with ``dequant_gemm`` on, through ``dequant_gemm.matmul``).

    Swapped in by changing ``__class__`` (see ``accelerate``), so parameter names, isinstance
    checks and fusing code see an ordinary QuantizedLinear.
    """

    def __call__(self, x):
        return base_linear(self, x)   # which falls back to QuantizedLinear's own call


def _np_view(a: mx.array) -> np.ndarray:
    mx.eval(a)
    return np.asarray(a)


@mx.custom_function
def _swiglu_np(gate, up):
    g, u = _np_view(gate), _np_view(up)
    out, _ = numpy_kernels.swiglu(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), keep_sigmoid=False)
    return mx.array(out.reshape(g.shape))


@_swiglu_np.vjp
def _swiglu_np_vjp(primals, cotangent, output):
    # Only the (already evaluated) primals go through NumPy; the cotangent stays lazy, since
    # evaluating it here would pin the whole backward graph so far in memory until the step ends.
    fg, fu = numpy_kernels.swiglu_factors(_np_view(primals[0]), _np_view(primals[1]))
    return cotangent * mx.array(fg), cotangent * mx.array(fu)


@mx.custom_function
def lean_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up whose backward keeps only gate and up and recomputes sigmoid(gate): autodiff
    of the plain expression (mlx-lm's compiled ``swiglu`` too, once inlined into the step's graph)
    also kept two (tokens x intermediate) arrays per layer (CPU, the GPU path forced, 1B dims, 512
    fp32 tokens: 0.18 -> 0.15 GiB per layer; 8B at 4 x 512 bf16 tokens: ~3.7 GiB over 32 layers)."""
    return nn.silu(gate) * up


@lean_swiglu.vjp
def _lean_swiglu_vjp(primals, cotangent, output):
    g, u = primals
    # recomputed once the cotangent exists, so the compiled graph cannot share the forward's
    # sigmoid and keep it from forward to backward
    s = mx.sigmoid(mx.depends(g, cotangent))
    return cotangent * u * (s * (1 + g * (1 - s))), cotangent * g * s   # d silu(g) = s (1 + g (1 - s))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: NumPy's vectorised exp on CPU (MLX's CPU sigmoid is scalar, ~8x slower),
    else (the GPU step) ``lean_swiglu``."""
    if on_cpu() and gate.dtype == mx.float32 and up.dtype == mx.float32:
        return _swiglu_np(gate, up)
    return lean_swiglu(gate, up)


_SWIGLU_SRC = "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"
_FAST_MLP: dict[type, type] = {}


def _fast_mlp_call(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu_mlp(cls: type) -> bool:
    try:
        return _SWIGLU_SRC in inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False


def route_mlps(model: nn.Module) -> int:
    """SwiGLU MLPs of ``model`` through ``swiglu`` above (class swapped per instance, once);
    returns how many were swapped."""
    n = 0
    for _, m in model.named_modules():
        cls = type(m)
        if cls in _FAST_MLP.values():
            continue
        if cls in _FAST_MLP or _is_swiglu_mlp(cls):
            if cls not in _FAST_MLP:
                _FAST_MLP[cls] = type(f"Fast{cls.__name__}", (cls,), {"__call__": _fast_mlp_call})
            m.__class__ = _FAST_MLP[cls]
            n += 1
    return n


def accelerate(model: nn.Module) -> int:
    """Route QuantizedLinears and SwiGLU MLPs of ``model`` through the CPU fast path.

    Classes are swapped per instance (``__class__``) so parameter names and ``isinstance`` stay as
    they were; off CPU the swapped classes compute what the originals do (``base_linear`` and
    ``swiglu`` pick the GPU forms). Returns the count.
    """
    n = 0
    _patch_attention(model)
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = FastQuantizedLinear
            n += 1
    return n + route_mlps(model)


def dense_weight(module: nn.Module) -> mx.array:
    """The (out, in) fp32 weight of a Linear / Embedding, dequantized when quantized."""
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return _dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                           module.bits, getattr(module, "mode", "affine"))
    w = module.weight
    return w if w.dtype == mx.float32 else w.astype(mx.float32)


def _chunk_loss(h, w, targets):
    """Per-row cross-entropy and softmax probabilities for one chunk of rows (plain MLX)."""
    logits = h @ w.T                                       # (rows, vocab)
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = mx.exp(logits - m)
    s = mx.sum(e, axis=-1, keepdims=True)
    target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
    loss = (m + mx.log(s) - target_logit).squeeze(-1)
    return loss, e, s


def _writable(a: mx.array) -> tuple[np.ndarray, bool]:
    """A NumPy view of an evaluated MLX array and True, or a copy and False.

    Writing through the view changes ``a`` itself; callers use that only on arrays they just
    created and nothing else references (a chunk of logits).
    """
    mx.eval(a)
    v = np.asarray(a)
    if v.flags.c_contiguous and v.flags.writeable:
        return v, True
    return np.array(v), False


def _ce_chunks(h, w, targets, grad: bool):
    """(sum of losses, dL/dh or None) in row chunks; NumPy for the softmax on CPU."""
    losses, grads = [], []
    np_targets = np.asarray(targets) if on_cpu() else None
    for start in range(0, h.shape[0], CE_CHUNK_ROWS):
        hc = h[start:start + CE_CHUNK_ROWS]
        if np_targets is not None:
            logits = hc @ w.T
            buf, shared = _writable(logits)
            tc = np_targets[start:start + CE_CHUNK_ROWS]
            losses.append(mx.array(numpy_kernels.softmax_ce(buf, tc, grad)))
            if grad:
                p = logits if shared else mx.array(buf)   # softmax - onehot, in place when shared
                grads.append(detached(p @ w))   # and drop this chunk's logits now
            continue
        tc = targets[start:start + CE_CHUNK_ROWS]
        loss, e, s = _chunk_loss(hc, w, tc)
        losses.append(loss)
        if grad:
            # d(sum loss)/d logits = softmax - onehot; push it through the projection right away.
            p = e * (1.0 / s)
            p = mx.put_along_axis(p, tc[:, None], mx.take_along_axis(p, tc[:, None], axis=-1) - 1.0, axis=-1)
            grads.append(p @ w)
    total = mx.sum(mx.concatenate(losses))
    return total, (mx.concatenate(grads) if grad else None)


@mx.custom_function
def _fused_ce(h, w, targets):
    return _ce_chunks(h, w, targets, grad=True)


@_fused_ce.vjp
def _fused_ce_vjp(primals, cotangents, outputs):
    h, w, targets = primals
    return (cotangents[0] * outputs[1], mx.zeros(w.shape, w.dtype), mx.zeros(targets.shape, targets.dtype))


def fused_cross_entropy(h: mx.array, head: nn.Module, targets: mx.array, with_grad: bool = True,
                        weight: mx.array | None = None) -> mx.array:
    """Sum of token cross-entropies for hidden states ``h`` (rows, dim) against ``targets`` (rows,).

    ``head`` is the output projection (lm_head, or the tied embedding); ``weight`` may give its
    dense fp32 weight already (a trainer caches it: the head is frozen). With ``with_grad=False``
    (validation) the gradient is not formed, which halves the cost.
    """
    w = dense_weight(head) if weight is None else weight
    h = h.astype(mx.float32)
    if with_grad:
        return _fused_ce(h, w, targets)[0]
    return _ce_chunks(h, w, targets, grad=False)[0]


def plain_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Reference: sum of cross-entropies from full logits (rows, vocab)."""
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="sum")


# ------------------------------------------------------------------ attention
# MLX's CPU scaled_dot_product_attention is a fallback whose softmax runs the scalar exp: on
# SmolLM2 (batch 4 x 111 tokens) it took 8.7 ms of an 18 ms attention block. Here the two
# products are BLAS matmuls and the softmax is NumPy's (vectorised exp); the probabilities are
# a second output, so the backward needs no exp at all.
@lru_cache(maxsize=None)
def _attention_fn(scale: float, causal: bool):
    @mx.custom_function
    def f(q, k, v):
        B, H, L, D = q.shape
        hkv, S = k.shape[1], k.shape[2]
        rep = H // hkv
        qg = q.reshape(B, hkv, rep * L, D)
        s, _ = _writable((qg * scale) @ k.swapaxes(-1, -2))      # (B, hkv, rep*L, S)
        numpy_kernels.softmax_(s, numpy_kernels.causal_mask(rep, L, S) if causal else None)
        p = mx.array(s)
        o = detached(p @ v).reshape(B, H, L, D)
        return o, p

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        q, k, v = primals
        B, H, L, D = q.shape
        hkv = k.shape[1]
        rep = H // hkv
        p = outputs[1]
        do = cotangents[0].reshape(B, hkv, rep * L, D)
        qg = q.reshape(B, hkv, rep * L, D)
        dv = p.swapaxes(-1, -2) @ do
        dp = do @ v.swapaxes(-1, -2)
        ds = p * (dp - mx.sum(dp * p, axis=-1, keepdims=True))
        dq = ((ds @ k) * scale).reshape(B, H, L, D)
        dk = (ds.swapaxes(-1, -2) @ qg) * scale
        return dq, dk, dv

    return f


def attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention``; BLAS + NumPy softmax on CPU for training shapes."""
    L = queries.shape[2]
    if (on_cpu() and sinks is None and not hasattr(cache, "bits") and L > 1
            and all(a.dtype == mx.float32 for a in (queries, keys, values))
            and queries.shape[1] % keys.shape[1] == 0 and (mask is None or (isinstance(mask, str) and mask == "causal"))):
        return _attention_fn(float(scale), mask == "causal")(queries, keys, values)[0]
    return _mlx_lm_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _mlx_lm_sdpa(*args, **kwargs):
    from mlx_lm.models.base import scaled_dot_product_attention
    return scaled_dot_product_attention(*args, **kwargs)


def _patch_attention(model: nn.Module) -> None:
    """Route the model's module-level ``scaled_dot_product_attention`` through ``attention``."""
    import sys
    for _, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and getattr(mod, "scaled_dot_product_attention", None) is not None \
                and mod.scaled_dot_product_attention is not attention and mod.__name__.startswith("mlx_lm.models"):
            mod.scaled_dot_product_attention = attention
