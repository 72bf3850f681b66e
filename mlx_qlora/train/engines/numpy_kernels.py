"""NumPy kernels for CPU training: RMSNorm, RoPE, SwiGLU, causal GQA attention, softmax
cross-entropy, and their backward. The CPU engine (``numpy_engine``) is built from them, and the
MLX-autodiff fast path (``mlx_cpu_kernels``) calls the softmax, SwiGLU and loss kernels from inside its
custom functions. NumPy's ``exp`` is vectorised (~400 M elements/s here) where MLX's CPU ``exp``
is scalar (~60 M/s).

Activations are (tokens, features) fp32 matrices of a packed batch; ``segments`` are the
(start, length) row ranges of its sequences. BLAS matmuls use every core by themselves; the
elementwise passes (exp above all) are single-threaded in NumPy, so the large ones are split by
rows over a small thread pool (NumPy releases the GIL inside its loops): on 2 cores the
SwiGLU, attention softmax and vocabulary softmax passes take about half the time. RMSNorm, its
backward, RoPE and SwiGLU write into preallocated outputs (SwiGLU in L2-sized row blocks) with the
operations of the plain expressions in the same order, so the fp32 path's bits do not depend on
the split (tests/test_cpu_engine.py::test_in_place_kernels_keep_the_bits).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

F32 = np.float32
# MLX_QLORA_THREADS: threads per process (the --nproc launcher sets it to cores / ranks).
THREADS = max(1, int(os.environ.get("MLX_QLORA_THREADS") or min(os.cpu_count() or 1, 8)))
MIN_SPLIT = 1 << 16            # elements below which a pass runs on the calling thread
_POOL: list[ThreadPoolExecutor] = []


def parallel(tasks: list) -> list:
    """Run zero-argument callables on the pool (the first on this thread); their results in order."""
    if len(tasks) <= 1 or THREADS == 1:
        return [t() for t in tasks]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(THREADS - 1, thread_name_prefix="mlx_qlora_cpu"))
    futures = [_POOL[0].submit(t) for t in tasks[1:]]
    first = tasks[0]()
    return [first] + [f.result() for f in futures]


def row_parts(rows: int, cols: int) -> list[tuple[int, int]]:
    """Split ``rows`` into up to THREADS contiguous ranges (one when the matrix is small)."""
    k = min(THREADS, max(1, rows * cols // MIN_SPLIT), rows)
    bounds = [rows * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ------------------------------------------------------------------ elementwise
def sigmoid_np(g: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):          # exp(88+) = inf gives sigmoid 0, as it should
        s = np.exp(-g)
    np.add(s, 1.0, out=s)
    return np.reciprocal(s, out=s)


def softmax_(s: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis, in place; entries where ``mask`` is True get probability 0
    (every row keeps at least one entry)."""
    if mask is not None:
        np.copyto(s, -np.inf, where=mask)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s *= 1.0 / s.sum(axis=-1, keepdims=True)
    return s


_CAUSAL_MASKS: dict[tuple[int, int, int], np.ndarray] = {}


def causal_mask(rep: int, L: int, S: int) -> np.ndarray:
    """(rep * L, S) True where a query row may not look (future keys), tiled over ``rep`` heads."""
    key = (rep, L, S)
    if key not in _CAUSAL_MASKS:
        m = np.triu(np.ones((L, S), bool), k=1 + S - L)
        if len(_CAUSAL_MASKS) > 64:            # row lengths vary per batch; keep a few
            _CAUSAL_MASKS.clear()
        _CAUSAL_MASKS[key] = np.tile(m, (rep, 1))
    return _CAUSAL_MASKS[key]


# ------------------------------------------------------------------ RMSNorm
def rms(x: np.ndarray, w: np.ndarray, eps: float, out16: np.ndarray | None = None, to16=None):
    """(x / rms(x) * w, x / rms(x), 1 / rms(x)) over the last axis of the (rows, dim) ``x``, split
    by rows over the threads (per row the same operations: the same bits). ``out16``/``to16``:
    also the first result's bf16 bits, rounded while each block is in cache."""
    y, n, r = np.empty(x.shape, F32), np.empty(x.shape, F32), np.empty((x.shape[0], 1), F32)

    def part(lo, hi):
        xb = x[lo:hi]
        r[lo:hi] = 1.0 / np.sqrt(np.mean(np.square(xb), axis=-1, keepdims=True) + eps)
        np.multiply(xb, r[lo:hi], out=n[lo:hi])
        np.multiply(n[lo:hi], w, out=y[lo:hi])
        if out16 is not None:
            to16(y[lo:hi], out16[lo:hi])

    parallel([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in row_parts(*x.shape)])
    return y, n, r


def rms_back(dy: np.ndarray, w: np.ndarray, n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """dL/dx of ``rms`` given dL/dy, the normalized rows ``n`` and ``r`` (split by rows as ``rms``)."""
    out = np.empty(dy.shape, F32)

    def part(lo, hi):
        g = dy[lo:hi] * w
        t = g * n[lo:hi]
        m = np.mean(t, axis=-1, keepdims=True)
        np.multiply(n[lo:hi], m, out=t)
        np.subtract(g, t, out=g)
        np.multiply(r[lo:hi], g, out=out[lo:hi])

    parallel([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in row_parts(*dy.shape)])
    return out


# ------------------------------------------------------------------ RoPE
def rope(x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray, dims: int, traditional: bool,
         inverse: bool = False) -> np.ndarray:
    """Rotate the first ``dims`` features of each head by +theta (or -theta: the transpose, for
    gradients). ``x`` is (tokens, heads * d); ``cos``/``sin`` are (tokens, 1, dims / 2)."""
    x3 = x.reshape(x.shape[0], heads, -1)
    out = np.empty(x3.shape, F32) if dims == x3.shape[-1] else x3.copy()   # unrotated features kept
    if inverse:
        sin = -sin
    i1, i2 = (slice(0, dims, 2), slice(1, dims, 2)) if traditional else (slice(0, dims // 2), slice(dims // 2, dims))

    def part(lo, hi):                 # x1 cos - x2 sin and x2 cos + x1 sin, written in place
        x1, x2, c, s = x3[lo:hi, :, i1], x3[lo:hi, :, i2], cos[lo:hi], sin[lo:hi]
        o1, o2 = out[lo:hi, :, i1], out[lo:hi, :, i2]
        t = x2 * s
        np.multiply(x1, c, out=o1)
        o1 -= t
        np.multiply(x1, s, out=t)
        np.multiply(x2, c, out=o2)
        o2 += t

    parallel([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in row_parts(x.shape[0], x.shape[1])])
    return out.reshape(x.shape)


# ------------------------------------------------------------------ SwiGLU
SUB_ROWS = 32     # rows per sub-block of the SwiGLU passes: 32 x 1536 x 4 B = 192 KiB per array, L2-resident


def _sub_blocks(lo: int, hi: int):
    return ((a, min(a + SUB_ROWS, hi)) for a in range(lo, hi, SUB_ROWS))


def swiglu(g: np.ndarray, u: np.ndarray, keep_sigmoid: bool, out16: np.ndarray | None = None, to16=None):
    """(silu(g) * u, sigmoid(g) or None). Written into preallocated outputs pass by pass in
    sub-blocks of rows that stay in cache (the same operations, in the same order, as
    ``sigmoid_np(g) * g * u``: the same bits). ``out16``/``to16``: also the result's bf16 bits,
    rounded by ``to16(fp32, uint16 out)`` while the block is in cache."""
    out = np.empty(g.shape, F32)
    sig = np.empty(g.shape, F32) if keep_sigmoid else None

    def part(lo, hi):
        tmp = None if sig is not None else np.empty((min(SUB_ROWS, hi - lo), g.shape[1]), F32)
        for a, b in _sub_blocks(lo, hi):
            s = sig[a:b] if sig is not None else tmp[:b - a]
            np.negative(g[a:b], out=s)
            with np.errstate(over="ignore"):          # exp(88+) = inf gives sigmoid 0, as it should
                np.exp(s, out=s)
            s += 1.0
            np.reciprocal(s, out=s)
            o = out[a:b]
            np.multiply(s, g[a:b], out=o)
            o *= u[a:b]
            if out16 is not None:
                to16(o, out16[a:b])

    parallel([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in row_parts(*g.shape)])
    return out, sig


def swiglu_factors(g: np.ndarray, u: np.ndarray, sig: np.ndarray | None = None):
    """(d/dg, d/du) of silu(g) * u, elementwise: (s (1 + g (1 - s)) u, g s) with s = sigmoid(g)
    (``sig`` when the forward kept it)."""
    s = sigmoid_np(g) if sig is None else sig
    fu = g * s
    fg = 1.0 - s
    fg *= g
    fg += 1.0
    fg *= s
    fg *= u
    return fg, fu


def swiglu_back(dact: np.ndarray, g: np.ndarray, u: np.ndarray, sig: np.ndarray | None,
                out16: np.ndarray | None = None, to16=None):
    """(dL/dg, dL/du) of silu(g) * u; ``sig`` is sigmoid(g) when kept by the forward. The passes of
    ``swiglu_factors`` times ``dact``, in the same order (the same bits), into the outputs, in
    cache-sized row blocks. ``out16``/``to16``: also (dL/dg, dL/du) as bf16 bits."""
    dg, du = np.empty(g.shape, F32), np.empty(u.shape, F32)

    def part(lo, hi):
        for a, b in _sub_blocks(lo, hi):
            s = sigmoid_np(g[a:b]) if sig is None else sig[a:b]
            d, e = dg[a:b], du[a:b]
            np.subtract(1.0, s, out=d)
            d *= g[a:b]
            d += 1.0
            d *= s
            d *= u[a:b]
            d *= dact[a:b]
            np.multiply(g[a:b], s, out=e)
            e *= dact[a:b]
            if out16 is not None:
                to16(d, out16[0][a:b])
                to16(e, out16[1][a:b])

    parallel([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in row_parts(*g.shape)])
    return dg, du


# ------------------------------------------------------------------ attention (causal, GQA)
class Heads:
    """Head layout: ``h`` query heads share ``hkv`` key/value heads (query head i uses kv head
    i // rep), each of ``d`` features; scores are scaled by ``scale``."""

    def __init__(self, h: int, hkv: int, d: int, scale: float):
        self.h, self.hkv, self.d, self.rep, self.scale = h, hkv, d, h // hkv, F32(scale)

    def group(self, t: np.ndarray, s: int, n: int) -> np.ndarray:
        """Query-shaped rows of one segment as (hkv, rep * n, d)."""
        return t[s:s + n].reshape(n, self.hkv, self.rep, self.d).transpose(1, 2, 0, 3).reshape(self.hkv, self.rep * n, self.d)

    def ungroup(self, t: np.ndarray, n: int) -> np.ndarray:
        return t.reshape(self.hkv, self.rep, n, self.d).transpose(2, 0, 1, 3).reshape(n, self.h * self.d)

    def kv(self, t: np.ndarray, s: int, n: int) -> np.ndarray:
        return np.ascontiguousarray(t[s:s + n].reshape(n, self.hkv, self.d).transpose(1, 0, 2))

    def kv_rows(self, t: np.ndarray, n: int) -> np.ndarray:
        return t.transpose(1, 0, 2).reshape(n, self.hkv * self.d)


def _balanced(segments: list[tuple[int, int]]) -> list[list[int]]:
    """Segment indices split over the threads, balancing the n^2 attention work."""
    groups = [[] for _ in range(min(THREADS, len(segments)))]
    load = [0] * len(groups)
    for i in sorted(range(len(segments)), key=lambda i: -segments[i][1]):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += segments[i][1] ** 2
    return [g for g in groups if g]


def causal_softmax(sc: np.ndarray, rep: int, n: int, scale) -> None:
    """Scores (hkv, rep * n, n) -> causal softmax of scale * scores, in place."""
    sc *= scale
    softmax_(sc, causal_mask(rep, n, n))


def softmax_back(dp: np.ndarray, p: np.ndarray, scale) -> None:
    """dL/d probabilities -> dL/d scores (before ``scale``), in place."""
    dp -= np.sum(dp * p, axis=-1, keepdims=True)
    dp *= p
    dp *= scale


def attention(q, k, v, segments, hd: Heads, keep_probs: bool, softmax=causal_softmax):
    """Causal softmax(q k^T * scale) v per segment; also the probabilities when ``keep_probs``.
    ``softmax``: the in-place scale, mask and softmax (``causal_softmax``'s signature)."""
    out = np.empty((q.shape[0], hd.h * hd.d), F32)
    probs = [None] * len(segments)

    def one(i):
        s, n = segments[i]
        sc = hd.group(q, s, n) @ hd.kv(k, s, n).transpose(0, 2, 1)        # (hkv, rep*n, n)
        softmax(sc, hd.rep, n, hd.scale)
        out[s:s + n] = hd.ungroup(sc @ hd.kv(v, s, n), n)
        if keep_probs:
            probs[i] = sc

    parallel([lambda g=g: [one(i) for i in g] for g in _balanced(segments)])
    return out, probs


def attention_back(do, q, k, v, probs, segments, hd: Heads, softmax_grad=softmax_back):
    """(dq, dk, dv) of ``attention`` from dL/d out and the kept probabilities."""
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)

    def one(i):
        (s, n), p = segments[i], probs[i]
        dos = hd.group(do, s, n)
        dv[s:s + n] = hd.kv_rows(p.transpose(0, 2, 1) @ dos, n)
        dp = dos @ hd.kv(v, s, n).transpose(0, 2, 1)
        softmax_grad(dp, p, hd.scale)                     # d scores
        dq[s:s + n] = hd.ungroup(dp @ hd.kv(k, s, n), n)
        dk[s:s + n] = hd.kv_rows(dp.transpose(0, 2, 1) @ hd.group(q, s, n), n)

    parallel([lambda g=g: [one(i) for i in g] for g in _balanced(segments)])
    return dq, dk, dv


# ------------------------------------------------------------------ loss
def softmax_ce(logits: np.ndarray, targets: np.ndarray, grad: bool) -> np.ndarray:
    """Row losses of (rows, vocab) fp32 logits; with ``grad`` turns ``logits`` in place into
    softmax - onehot (the gradient of the summed loss w.r.t. the logits)."""
    rows = np.arange(logits.shape[0])
    m = logits.max(axis=1, keepdims=True)
    target_logit = logits[rows, targets]
    np.subtract(logits, m, out=logits)
    np.exp(logits, out=logits)
    s = logits.sum(axis=1, keepdims=True, dtype=np.float64)
    loss = (m[:, 0] + np.log(s[:, 0])) - target_logit
    if grad:
        np.multiply(logits, (1.0 / s).astype(np.float32), out=logits)
        logits[rows, targets] -= 1.0
    return loss.astype(np.float32)


def softmax_ce_rows(logits: np.ndarray, targets: np.ndarray, grad: bool) -> np.ndarray:
    """``softmax_ce`` split by rows over the threads (in place on ``logits``)."""
    parts = row_parts(*logits.shape)
    losses = parallel([lambda lo=lo, hi=hi: softmax_ce(logits[lo:hi], targets[lo:hi], grad) for lo, hi in parts])
    return np.concatenate(losses)
