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

    def forward(self, x: np.ndarray, rng, ctx: dict | None, x16: np.ndarray | None = None) -> np.ndarray:
        y = self.matmul(x, self.weight(), True, x16)
        if self.bias is not None:
            y += self.bias
        if self.lora is not None:
            xd, keep = x, None
            if self.p > 0 and rng is not None:       # no rng: evaluation, no dropout
                keep = rng.random(x.shape, dtype=F32) >= self.p
                xd = x * keep * F32(1.0 / (1.0 - self.p))
            if self.bf16 is not None:            # oneMKL sgemm: the up-product added into y in place
                a, bs = self.factors()
                xa = xd @ a                             # (OpenBLAS was faster for this narrow product)
                self.bf16.sgemm(xa, bs, y, beta=1.0)
            else:
                xa = xd @ _np(self.lora.lora_a)
                y += xa @ (_np(self.lora.lora_b) * F32(self.lora.scale))
            if ctx is not None:
                ctx[self.path] = (xd, xa, keep)
        return y

    def backward(self, dy: np.ndarray, ctx: dict, grads: dict, need_dx: bool,
                 dy16: np.ndarray | None = None) -> np.ndarray | None:
        dx = self.matmul(dy, self.weight(), False, dy16) if need_dx else None
        if self.lora is not None and self.bf16 is not None:
            xd, xa, keep = ctx.pop(self.path)
            a, bs = self.factors()
            mkl = self.bf16
            grads[self.path + ".lora_b"] = mkl.sgemm(xa, dy, ta=True, alpha=float(self.lora.scale))
            dxa = dy @ bs.T                                     # (OpenBLAS was faster for this narrow product)
            grads[self.path + ".lora_a"] = mkl.sgemm_tn(xd, dxa)
            if need_dx:
                if keep is None:
                    mkl.sgemm(dxa, a, dx, tb=True, beta=1.0)   # dx += dxa @ a.T in place
                else:
                    dxl = mkl.sgemm(dxa, a, tb=True)
                    dxl *= keep * F32(1.0 / (1.0 - self.p))
                    dx += dxl
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
