"""The output head and cross-entropy of the CPU engine's bf16 path, in vocabulary chunks.

Why: the fp32 path materializes (rows, vocab) logits (256 x 49152 x 4 B = 48 MiB per chunk on
SmolLM2) and walks them ~6 times (max, exp, sum, scale, bf16 rounding of the gradient, ...), all
from memory. Here each thread takes half the vocabulary and walks it in column chunks of
``CHUNK_COLS`` whose logits stay in its L2 cache, keeping a running row max ``m``, sum ``s`` of
exp(logit - m) and the unnormalized gradient ``acc = sum_j exp(logit_j - m) w_j`` (rescaled by
exp(m_old - m_new) when the max grows, as online softmax does). At the end the threads' partial
results are merged and

    loss_i = m_i + log s_i - logit_{i,t_i}      dL/dh_i = acc_i / s_i - w_{t_i}

(``w_t``: the target's row of the head, exact from its bf16 bits; the fp32 path instead rounds
softmax - onehot to bf16 as a whole, target entry included).

Precision (the bound tests/test_cpu_gemm.py::test_chunked_head_within_derived_bound checks): the
logits come from the same bf16 GEMM as before (|dlogit_ij| <= delta_i := gamma(D) max_j |h_i| @
|w_j|), so a row's loss moves by at most 2 delta_i; softmax probabilities by a factor within
exp(+-2 delta_i); the exp values p_ij in (0, 1] are rounded to bf16 (u = 2^-8 relative) before the
second GEMM, which accumulates V terms in fp32. So |dh_16 - dh| <= (exp(2 delta_i) - 1 + 2u + u^2 +
V 2^-24 + c 2^-24) (p_i / s_i) @ |W| elementwise, c covering the fp32 exp, rescaling and division.
"""
from __future__ import annotations

import numpy as np

from . import cpu_fused, numpy_kernels
from .cpu_gemm import round_bf16_into, to_bf16

CHUNK_COLS = 1024     # vocabulary columns per chunk: 256 rows x 1024 x 4 B = 1 MiB of logits (L2: 2 MiB)


def _part(lib, h16: np.ndarray, w16: np.ndarray, lo: int, hi: int, targets: np.ndarray, scale: np.float32,
          grad: bool):
    """Running (max, sum, target logits, unnormalized gradient) of columns lo:hi, on this thread."""
    rows, dim = h16.shape
    m = np.full(rows, -np.inf, np.float32)
    s = np.zeros(rows, np.float64)
    tl = np.zeros(rows, np.float32)
    acc = np.zeros((rows, dim), np.float32) if grad else None
    logits = np.empty(rows * min(CHUNK_COLS, hi - lo), np.float32)     # flat: a short last chunk stays contiguous
    p16 = np.empty(logits.shape, np.uint16) if grad else None
    alpha = np.empty(rows, np.float32)
    fused = cpu_fused.load()[0]
    for c0 in range(lo, hi, CHUNK_COLS):
        c1 = min(c0 + CHUNK_COLS, hi)
        L = logits[:rows * (c1 - c0)].reshape(rows, c1 - c0)
        lib.gemm(h16, w16[c0:c1], True, L)
        if scale != 1:
            L *= scale
        here = (targets >= c0) & (targets < c1)
        tl[here] = L[here, targets[here] - c0]
        P = p16[:rows * (c1 - c0)].reshape(rows, c1 - c0) if grad else None
        if fused is not None:        # max, exp, sum and the bf16 rounding in two passes over the chunk
            fused.softmax_chunk(L, m, s, alpha, P)
            if grad:
                acc *= alpha[:, None]
                lib.gemm(P, w16[c0:c1], False, acc, beta=1.0)
            continue
        m_new = np.maximum(m, L.max(axis=1))
        np.subtract(m, m_new, out=alpha)             # -inf on the first chunk: alpha = 0
        np.exp(alpha, out=alpha)
        m = m_new
        L -= m[:, None]
        np.exp(L, out=L)
        s *= alpha
        s += L.sum(axis=1, dtype=np.float64)
        if grad:
            acc *= alpha[:, None]
            round_bf16_into(L, P)
            lib.gemm(P, w16[c0:c1], False, acc, beta=1.0)
    return m, s, tl, acc


def head_loss(lib, h: np.ndarray, w16: np.ndarray, targets: np.ndarray, grad: bool, scale=np.float32(1.0)):
    """(row losses float64, dL/dh fp32 or None) of rows ``h`` (rows, dim) fp32 against the bf16
    head ``w16`` (vocab, dim); ``scale`` multiplies the logits (Granite's 1 / logits_scaling)."""
    vocab = w16.shape[0]
    h16 = to_bf16(h)
    targets = np.asarray(targets, np.int64)
    k = min(numpy_kernels.THREADS, max(1, vocab // CHUNK_COLS))
    bounds = [vocab * i // k // CHUNK_COLS * CHUNK_COLS for i in range(k)] + [vocab]
    parts = numpy_kernels.parallel([lambda lo=lo, hi=hi: _part(lib, h16, w16, lo, hi, targets, scale, grad)
                                    for lo, hi in zip(bounds[:-1], bounds[1:])])
    m = np.max([p[0] for p in parts], axis=0)
    f = [np.exp(p[0] - m) for p in parts]           # each part's sum and gradient rescaled to the common max
    s = sum(p[1] * fi for p, fi in zip(parts, f))
    tl = sum(p[2] for p in parts)                   # each target lies in one part; the others hold 0
    loss = m.astype(np.float64) + np.log(s) - tl
    if not grad:
        return loss, None
    acc = parts[0][3] * f[0][:, None]
    for p, fi in zip(parts[1:], f[1:]):
        acc += p[3] * fi[:, None]
    acc *= (1.0 / s).astype(np.float32)[:, None]
    acc -= (w16[targets].astype(np.uint32) << 16).view(np.float32)
    if scale != 1:
        acc *= scale
    return loss, acc
