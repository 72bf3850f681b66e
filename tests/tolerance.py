"""Numerical tolerances from the device MLX runs on and the dtype compared.

On CPU, float32 is IEEE float32 and every bound is the one the test states (``tol(1e-4)`` returns
1e-4: never loosened on CPU). On a GPU:

- float32 matmuls may run as TF32 (CUDA tensor cores, 10-bit mantissa: unit roundoff 2**-11 ~
  4.9e-4 per product); agreement of 1.7e-4 to 2.7e-4 relative was measured on an H200, so a
  float32 bound becomes at least ``GPU_FP32`` = 1e-3;
- float16 (10-bit mantissa) results at least ``FP16`` = 2e-3, bfloat16 (7-bit: 2**-8 ~ 3.9e-3)
  at least ``BF16`` = 2e-2, on any device (these are properties of the dtype, not the device).

``transient_s(seconds)`` stretches a subprocess time limit on a GPU, whose first use compiles
kernels (the CUDA JIT took longer than 30 s for the chat/generate tests).
"""
from __future__ import annotations

GPU_FP32 = 1e-3
FP16 = 2e-3
BF16 = 2e-2
GPU_FIRST_USE_S = 240.0


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def tol(cpu_fp32: float, dtype=None) -> float:
    """The bound for a comparison stated as ``cpu_fp32`` for float32 on CPU."""
    import mlx.core as mx

    dtype = mx.float32 if dtype is None else dtype
    if dtype == mx.bfloat16:
        return max(cpu_fp32, BF16)
    if dtype == mx.float16:
        return max(cpu_fp32, FP16)
    return max(cpu_fp32, GPU_FP32) if on_gpu() else cpu_fp32


def transient_s(seconds: float) -> float:
    """A subprocess time limit: ``seconds`` on CPU, plus the first-use kernel compilation on a GPU."""
    return seconds + GPU_FIRST_USE_S if on_gpu() else seconds


def tol_abs(cpu_fp32: float, ref, dtype=None) -> float:
    """An absolute bound on values like logits: ``cpu_fp32`` on CPU float32; elsewhere at least the
    relative bound of ``tol`` times the largest magnitude in ``ref`` (rounding scales with it)."""
    import numpy as np

    rel = tol(0.0, dtype)
    return max(cpu_fp32, rel * float(np.abs(np.asarray(ref, dtype=np.float64)).max())) if rel else cpu_fp32
