"""Frozen 4-bit projections of the GPU training step as dequantize + dense GEMM, recomputed in backward.

Why (MLX 0.32's CUDA backend, ``mlx/backend/cuda/quantized/quantized.cpp``): ``quantized_matmul``
picks the Hopper kernel only when the group size covers the whole input dimension, so a group-64
4-bit weight runs x @ W.T on the Ampere-style ``qmm_sm80`` kernel and x @ W (``transpose=False``,
the product every backward pass through a frozen linear needs: dL/dx = dL/dy @ W) on
``qmm_naive``. The dense bf16 matmul is cuBLASLt with the device's own tensor-core kernels. For
a training step's row counts (thousands of tokens) dequantizing first is cheap: a 4096 x 14336
weight is read as 29 MiB (4-bit + scales) and written as 112 MiB bf16, ~0.05 ms at H200 bandwidth,
against a GEMM of 2 x 2048 x 4096 x 14336 = 240 GFLOP. On the H200 run in the README torch's bf16
GEMMs did an 8B step 2.2x faster than MLX's quantized kernels: this is meant to close that gap
without giving up the 4-bit memory (bitsandbytes and Unsloth train 4-bit bases the same way). The
GPU speed-up is not measured yet (no GPU in the session that wrote it): ``bench/train_gpu.py``
runs ``mlx_qlora_qmm`` beside ``mlx_qlora`` so the next GPU run says whether "auto" is right.

Memory stays 4-bit: ``matmul`` is a custom function whose backward dequantizes the weight again, so
no dense copy is kept between forward and backward, and ``mx.depends`` makes each dequantize wait
for the activation (forward) or cotangent (backward) that consumes it, so the scheduler cannot
run a model's dequantizes early and hold them all. Measured on CPU (fp32, MLP blocks of 1B dims,
256 rows): a constant of about two dense weights over the quantized kernels, not growing with
depth (+62 MiB per block against +100 MiB for MLX's CPU quantized kernels; MLX's CPU dequantize
also makes a same-size temporary, which a GPU's one-kernel dequantize does not).
``tests/test_dequant_gemm.py`` checks values, gradients and a peak-memory bound.

The vocabulary head (128k rows) goes through ``sliced_matmul``: 32 MiB of its rows dequantized at a
time, since the loss runs when every activation is alive and a whole dense head would add to the
peak (0.5 GiB bf16 at 1B, 1 GiB at 8B).

Used where ``enabled`` says so (``base_matmul`` in the training config; "auto" = on CUDA) and the
product has at least ``MIN_ROWS`` rows; below that the quantized kernels (qmv) read less memory.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

MIN_ROWS = 256                 # rows (tokens) of x from which dequantize + GEMM is used
SLICE_BYTES = 32 * 2 ** 20     # dense rows of a vocabulary head dequantized at once (sliced_matmul)
_ON = [False]


def on_cuda() -> bool:
    """MLX runs on an NVIDIA GPU (the default device is a GPU and the CUDA backend is there)."""
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def resolve(mode: str) -> bool:
    """True when the ``base_matmul`` setting ``mode`` means dequantize + GEMM here. "auto": on CUDA
    (see above); Metal's quantized kernels have a tuned transposed-weight path and stay; the CPU
    has its own kernels (``mlx_cpu_kernels``)."""
    return on_cuda() if mode == "auto" else mode == "dense"


@contextmanager
def enabled(on: bool = True):
    """Inside: projections and the output head trace as dequantize + GEMM (read at trace time,
    so the step function is traced and called inside it)."""
    old, _ON[0] = _ON[0], on
    try:
        yield
    finally:
        _ON[0] = old


def applies(x: mx.array) -> bool:
    return _ON[0] and x.size // max(x.shape[-1], 1) >= MIN_ROWS


def quant_args(q: nn.Module) -> tuple[tuple, tuple]:
    """((weight, scales[, biases]), (group_size, bits, mode, has_biases)) of a quantized module."""
    has_biases = q.get("biases") is not None
    arrays = (q.weight, q.scales) + ((q.biases,) if has_biases else ())
    return arrays, (q.group_size, q.bits, getattr(q, "mode", "affine"), has_biases)


def dequantized(arrays, layout, after: mx.array, dtype) -> mx.array:
    """The dense (out, in) weight in ``dtype``, computed only once ``after`` is (ordering, see
    above)."""
    group_size, bits, mode, has_biases = layout
    w, scales, *rest = mx.depends(list(arrays), [after])
    biases = rest[0] if has_biases else None
    d = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return d if d.dtype == dtype else d.astype(dtype)


@lru_cache(maxsize=None)
def _matmul_fn(layout):
    @mx.custom_function
    def f(x, *arrays):
        return x @ dequantized(arrays, layout, x, x.dtype).T

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, *arrays = primals
        dx = cotangent @ dequantized(arrays, layout, cotangent, cotangent.dtype)
        # frozen weights: their cotangents are never used; mx.zeros holds no reference to them
        return (dx.astype(x.dtype),) + tuple(mx.zeros(a.shape, a.dtype) for a in arrays)

    return f


def matmul(x: mx.array, q: nn.QuantizedLinear) -> mx.array:
    """``x @ W.T`` for a QuantizedLinear (its bias not added) as dequantize + GEMM."""
    arrays, layout = quant_args(q)
    return _matmul_fn(layout)(x, *arrays)


def sliced_matmul(x: mx.array, arrays, layout, transpose: bool) -> mx.array:
    """``x @ W.T`` (transpose) or ``x @ W`` for a large 4-bit (rows, in) weight such as a 128k
    vocabulary head, dequantizing ``SLICE_BYTES`` of its rows at a time, each slice after the
    previous slice's product: the dense transient is one slice (32 MiB), not the whole head (1 GiB
    at 8B), which would add to the step's peak (the loss runs when every activation is alive)."""
    group_size, bits, mode, has_biases = layout
    n, d = arrays[0].shape[0], arrays[0].shape[1] * 32 // bits
    step = max(1, SLICE_BYTES // (d * x.dtype.size))
    parts, prev = [], x
    for a in range(0, n, step):
        w = dequantized(tuple(t[a:a + step] for t in arrays), layout, prev, x.dtype)
        prev = x @ w.T if transpose else (x[..., a:a + step] @ w).astype(mx.float32)   # fp32 partial sums
        parts.append(prev)
    if transpose:
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out.astype(x.dtype)


def dense_linear_bytes(model: nn.Module, itemsize: int) -> int:
    """Bytes of the largest dense weight one projection dequantizes to (the transient it adds)."""
    sizes = [m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits for _, m in model.named_modules()
             if isinstance(m, nn.QuantizedLinear)]
    return max(sizes, default=0) * itemsize
