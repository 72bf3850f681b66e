"""One frozen projection of the CPU engine (``numpy_engine``) with its optional LoRA branch:
forward, backward, and the weight it multiplies by (cached, or dequantized per use).

On the fp32 path every product is NumPy's BLAS (the engine's original arithmetic, bit for bit).
On the bf16 path (``bf16``: a ``cpu_gemm.MklBf16``) the frozen product takes bf16 operands with
fp32 accumulation, and the LoRA products stay fp32 but go through oneMKL's sgemm where that adds
into an existing output in place (beta = 1: no temporary, no second pass over it).
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cpu_gemm import to_bf16
from .numpy_kernels import parallel
from ..lora import LoRALinear, linear_dims
from .mlx_cpu_kernels import dense_weight

F32 = np.float32


def _np(a: mx.array) -> np.ndarray:
    """fp32 NumPy view of an MLX array (a copy only when a cast is needed)."""
    a = a if a.dtype == mx.float32 else a.astype(mx.float32)
    mx.eval(a)
    return np.asarray(a)


class _Proj:
    """One frozen projection (4-bit or dense) with an optional LoRA branch. With ``bf16`` (a
    ``cpu_gemm.MklBf16``) its base products take bf16 operands (the weight kept or made as bf16
    bits), accumulated in fp32; the LoRA branch stays fp32."""

    def __init__(self, module: nn.Module, path: str, bf16=None):
        self.lora = module if isinstance(module, LoRALinear) else None
        self.base = self.lora.linear if self.lora else module
        self.path = path
        self.bias = _np(self.base["bias"]) if "bias" in self.base else None
        self.p = 1.0 - getattr(self.lora.dropout, "_p_1", 1.0) if self.lora else 0.0
        self.cached: np.ndarray | None = None
        self._factors = None
        self.bf16 = bf16
        self.nbytes = (2 if bf16 else 4) * math.prod(linear_dims(self.base))   # of its fp32 / bf16 weight

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, scale * B) as fp32 NumPy, converted once per value of the factors (the optimizer
        replaces the MLX arrays each step; the ones converted are held, so identity is a safe key)."""
        la, lb = self.lora.lora_a, self.lora.lora_b
        if self._factors is None or self._factors[0] is not la or self._factors[1] is not lb:
            self._factors = (la, lb, _np(la), np.ascontiguousarray(_np(lb) * F32(self.lora.scale)))
        return self._factors[2], self._factors[3]

    def weight(self) -> np.ndarray:
        """The (out, in) fp32 weight (bf16 bits with ``bf16``): the cached copy, or dequantized now
        and dropped after use."""
        if self.cached is not None:
            return self.cached
        if self.bf16 is None:
            return _np(dense_weight(self.base))
        # rounded in the same MLX evaluation as the dequantize (round to nearest even, as to_bf16)
        w16 = dense_weight(self.base).astype(mx.bfloat16).view(mx.uint16)
        mx.eval(w16)
        return np.asarray(w16)

    def matmul(self, x: np.ndarray, w: np.ndarray, transpose: bool, x16: np.ndarray | None = None) -> np.ndarray:
        """``x @ w.T`` (``transpose``: the forward) or ``x @ w`` (the input gradient), ``w`` from
        ``weight()``: fp32 BLAS, or bf16 operands accumulated in fp32 (``x16``: ``x`` already
        converted, when projections share their input)."""
        if self.bf16 is None:
            return x @ w.T if transpose else x @ w
        return self.bf16.matmul(to_bf16(x) if x16 is None else x16, w, transpose)

    def _keep(self, x: np.ndarray, rng) -> np.ndarray | None:
        """The dropout mask of this LoRA input (None: no dropout, or evaluation: no rng)."""
        return rng.random(x.shape, dtype=F32) >= self.p if self.lora is not None and self.p > 0 and rng is not None \
            else None

    def forward(self, x: np.ndarray, rng, ctx: dict | None, x16: np.ndarray | None = None) -> np.ndarray:
        y = self.matmul(x, self.weight(), True, x16)
        if self.bias is not None:
            y += self.bias
        if self.lora is not None:
            self._lora_forward(x, y, self._keep(x, rng), ctx, serial=False)
        return y

    def _lora_forward(self, x, y, keep, ctx, serial: bool) -> None:
        """y += scale * (dropout(x) @ A) @ B in place. ``serial``: every product on this thread."""
        xd = x if keep is None else x * keep * F32(1.0 / (1.0 - self.p))
        if self.bf16 is not None:            # oneMKL sgemm: the up-product added into y in place
            a, bs = self.factors()
            xa = xd @ a                             # (OpenBLAS was faster for this narrow product)
            self.bf16.sgemm(xa, bs, y, beta=1.0, serial=serial)
        else:
            xa = xd @ _np(self.lora.lora_a)
            y += xa @ (_np(self.lora.lora_b) * F32(self.lora.scale))
        if ctx is not None:
            ctx[self.path] = (xd, xa, keep)

    def backward(self, dy: np.ndarray, ctx: dict, grads: dict, need_dx: bool,
                 dy16: np.ndarray | None = None) -> np.ndarray | None:
        dx = self.matmul(dy, self.weight(), False, dy16) if need_dx else None
        if self.lora is not None and self.bf16 is not None:
            self._lora_backward_bf16(dy, ctx.pop(self.path), grads, dx, serial=False)
        elif self.lora is not None:
            xd, xa, keep = ctx.pop(self.path)
            s = F32(self.lora.scale)
            a, b = _np(self.lora.lora_a), _np(self.lora.lora_b)
            grads[self.path + ".lora_b"] = (xa.T @ dy) * s
            dxa = (dy @ b.T) * s
            grads[self.path + ".lora_a"] = xd.T @ dxa
            if need_dx:
                dxl = dxa @ a.T
                if keep is not None:
                    dxl *= keep * F32(1.0 / (1.0 - self.p))
                dx += dxl
        return dx

    def _lora_backward_bf16(self, dy, kept, grads: dict, dx, serial: bool) -> None:
        """The LoRA factors' gradients, and dx += the branch's input gradient (dx None: not needed)."""
        xd, xa, keep = kept
        a, bs = self.factors()
        mkl = self.bf16
        grads[self.path + ".lora_b"] = mkl.sgemm(xa, dy, ta=True, alpha=float(self.lora.scale), serial=serial)
        dxa = dy @ bs.T                                     # (OpenBLAS was faster for this narrow product)
        grads[self.path + ".lora_a"] = mkl.sgemm(xd, dxa, ta=True, serial=True) if serial else mkl.sgemm_tn(xd, dxa)
        if dx is not None:
            if keep is None:
                mkl.sgemm(dxa, a, dx, tb=True, beta=1.0, serial=serial)   # dx += dxa @ a.T in place
            else:
                dxl = mkl.sgemm(dxa, a, tb=True, serial=serial)
                dxl *= keep * F32(1.0 / (1.0 - self.p))
                dx += dxl


# ------------------------------------------------------------------ projections that share work
# On the bf16 path a LoRA branch is a handful of narrow products (rank columns) that split badly
# over threads; q/k/v (and gate/up) have independent branches, so their base products run first,
# each split over the kernel pool, then the branches run side by side, one per pool thread, each on
# its thread alone (2 cores: ~120 -> ~70 ms of a step's LoRA work). Dropout masks are drawn in
# order before, so the draws are those of one-by-one calls; the results are the same products.
def forward_many(projs: list, x: np.ndarray, rng, ctx: dict | None, x16: np.ndarray | None) -> list:
    """[p.forward(x, rng, ctx, x16) for p in projs], with the LoRA branches side by side (bf16 path)."""
    if any(p.bf16 is None for p in projs):
        return [p.forward(x, rng, ctx, x16) for p in projs]
    ys, tasks = [], []
    for p in projs:
        y = p.matmul(x, p.weight(), True, x16)
        if p.bias is not None:
            y += p.bias
        ys.append(y)
        if p.lora is not None:
            keep = p._keep(x, rng)
            p.factors()              # MLX -> NumPy here: MLX has no stream on the pool's threads
            tasks.append(lambda p=p, y=y, keep=keep: p._lora_forward(x, y, keep, ctx, serial=True))
    parallel(tasks)
    return ys


def backward_many(items: list, ctx: dict, grads: dict, need_dx: bool) -> list:
    """[p.backward(dy, ctx, grads, need_dx, dy16) for p, dy, dy16 in items], with the LoRA branches
    side by side (bf16 path)."""
    if any(p.bf16 is None for p, _, _ in items):
        return [p.backward(dy, ctx, grads, need_dx, dy16) for p, dy, dy16 in items]
    dxs = [p.matmul(dy, p.weight(), False, dy16) if need_dx else None for p, dy, dy16 in items]
    for p, _, _ in items:
        if p.lora is not None:
            p.factors()              # MLX -> NumPy here: MLX has no stream on the pool's threads
    parallel([lambda p=p, dy=dy, dx=dx, kept=ctx.pop(p.path): p._lora_backward_bf16(dy, kept, grads, dx, serial=True)
              for (p, dy, _), dx in zip(items, dxs) if p.lora is not None])
    return dxs
