"""The bf16 path's fused C kernels (train/engines/cpu_fused.py) against NumPy's (numpy_kernels).

Bound: every kernel is fp32 arithmetic in a different order than NumPy's passes (and Cephes'
expf, ~1 ulp, for exp). An element that takes m rounded fp32 operations is within m 2^-24 of
its value relative to the size of its terms; a row reduction over `cols` terms (RMSNorm's sum of
squares, its backward's dot product) adds cols 2^-24 relative to the sum of |terms|. So each
check is |fused - numpy| <= (ops + cols) 2^-24 x scale, with scale the output's magnitude
(its row maximum): 2-3 orders of magnitude below bf16's 2^-8, which is why only the bf16 path
uses these kernels. The bf16 bits they write equal cpu_gemm.to_bf16 of their fp32 outputs exactly.
"""
from __future__ import annotations

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import numpy as np
import pytest

from mlx_qlora.train.engines import cpu_fused, cpu_gemm, numpy_kernels as ops

FUSED, WHY = cpu_fused.load()
needs_fused = pytest.mark.skipif(FUSED is None, reason=f"no fused kernels: {WHY}")
U32 = 2.0 ** -24
OPS = 16        # rounded fp32 operations per element, exp's polynomial included (a generous count)


def _close(got, want, cols=0):
    scale = np.max(np.abs(want), axis=-1, keepdims=True) if want.ndim > 1 else np.max(np.abs(want))
    assert np.all(np.abs(got - want) <= (OPS + cols) * U32 * scale), np.max(np.abs(got - want) / scale)


def _data(seed=0, rows=67, dim=96, inter=160):
    rng = np.random.default_rng(seed)
    f = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)   # noqa: E731
    return rng, f(rows, dim, k=3.0), f(dim), f(rows, inter, k=4.0), f(rows, inter), f(rows, inter), f(rows, dim)


@needs_fused
@pytest.mark.parametrize("seed", [0, 1])
def test_rmsnorm_and_backward(seed):
    _, x, w, _, _, _, dy = _data(seed)
    y16 = np.empty(x.shape, np.uint16)
    got, want = FUSED.rms(x, w, 1e-5, y16), ops.rms(x, w, 1e-5)
    for a, b in zip(got, want):
        _close(a, b, x.shape[1])
    assert (y16 == cpu_gemm.to_bf16(got[0])).all()
    _close(FUSED.rms_back(dy, w, want[1], want[2]), ops.rms_back(dy, w, want[1], want[2]), x.shape[1])


@needs_fused
@pytest.mark.parametrize("keep", [True, False])
def test_swiglu_and_backward(keep):
    _, _, _, g, u, dact, _ = _data(2)
    g[0, :6] = [-120.0, -88.0, -30.0, 0.0, 30.0, 120.0]       # exp's clamps: sigmoid 0 and 1
    out16 = np.empty(g.shape, np.uint16)
    (out, sig), (want, wsig) = FUSED.swiglu(g, u, keep, out16), ops.swiglu(g, u, True)
    _close(out, want)
    assert (out16 == cpu_gemm.to_bf16(out)).all() and np.isfinite(out).all()
    if keep:
        _close(sig, wsig)
    d16 = (np.empty(g.shape, np.uint16), np.empty(g.shape, np.uint16))
    got = FUSED.swiglu_back(dact, g, u, sig, d16)
    for a, b, bits in zip(got, ops.swiglu_back(dact, g, u, wsig), d16):
        _close(a, b)
        assert (bits == cpu_gemm.to_bf16(a)).all()


@needs_fused
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [32, 16])          # whole head, and partial (the rest copied)
def test_rope_both_directions(traditional, dims):
    rng = np.random.default_rng(3)
    tokens, heads, hd = 23, 3, 32
    x = rng.standard_normal((tokens, heads * hd)).astype(np.float32)
    theta = np.arange(tokens)[:, None] * (10000.0 ** (-np.arange(0, dims, 2) / dims))[None]
    cos, sin = (f(theta).astype(np.float32)[:, None, :] for f in (np.cos, np.sin))
    for inverse in (False, True):
        got = FUSED.rope(x, heads, cos, sin, dims, traditional, inverse)
        _close(got, ops.rope(x, heads, cos, sin, dims, traditional, inverse))
    back = FUSED.rope(FUSED.rope(x, heads, cos, sin, dims, traditional), heads, cos, sin, dims, traditional, True)
    _close(back, x)                                  # the inverse rotation undoes the forward one


@needs_fused
def test_bf16_rounding_has_numpys_bits():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((37, 129)) * 10.0 ** rng.integers(-40, 38, (37, 129))).astype(np.float32)
    x[0, :8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0000001, 3.4e38, 1e-40]
    x.view(np.uint32)[1, :4] = [0x3F808000, 0x3F818000, 0x7FFFFFFF, 0xFF800001]   # ties, NaN payloads
    want = np.empty(x.shape, np.uint16)
    cpu_gemm._round_rows(x.view(np.uint32), want)
    want[np.isnan(x)] = 0x7FC0
    assert (FUSED.to_bf16(x) == want).all()
    assert (FUSED.round_bf16_into(x, np.empty(x.shape, np.uint16)) == want).all()
    assert (cpu_gemm.to_bf16(x) == want).all()


def test_switch_off_and_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_fused, "_STATE", [])
    monkeypatch.setenv(cpu_fused.ENV_VAR, "off")
    assert cpu_fused.load() == (None, f"disabled by {cpu_fused.ENV_VAR}=off")
    monkeypatch.setattr(cpu_fused, "_STATE", [])
    monkeypatch.delenv(cpu_fused.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    fused, why = cpu_fused.load()
    assert fused is None and "no-such-cc" in why
    assert not list(tmp_path.rglob("*.so"))                      # nothing half-built left behind


@needs_fused
def test_engine_kernels_follow_the_gemm_path(tiny_llama_q4):
    """The bf16 path runs the fused kernels; the fp32 path and evaluation keep NumPy's."""
    from mlx_qlora.train.engines.numpy_engine import CpuEngine
    from test_cpu_engine import model_for
    model = model_for(tiny_llama_q4, bits=None)
    lib = cpu_gemm.load_library()[0]
    if lib is None:
        pytest.skip("no bf16 GEMM library")
    bf16, fp32 = CpuEngine(model, bf16=lib), CpuEngine(model)
    assert all(b.k is FUSED for b in bf16.blocks) and all(b.k is ops for b in fp32.blocks)
    assert "fused C kernels" in bf16.kernels_note() and fp32.kernels_note() == ""
    with bf16._fp32_products():
        assert all(b.k is ops for b in bf16.blocks)


@needs_fused
@pytest.mark.parametrize("grad", [True, False])
def test_online_softmax_chunks_match_numpys(monkeypatch, grad):
    """bf16_head with the fused chunk kernel = with NumPy's passes: the same bf16 logits, so only
    the exp (~1 ulp) and the order of the sums differ (the float64 sums: within 16 2^-24)."""
    from mlx_qlora.train.engines import bf16_head
    lib = cpu_gemm.load_library()[0]
    if lib is None:
        pytest.skip("no bf16 GEMM library")
    rng = np.random.default_rng(5)
    h = rng.standard_normal((19, 64)).astype(np.float32)
    w16 = cpu_gemm.to_bf16((rng.standard_normal((3 * bf16_head.CHUNK_COLS + 77, 64)) / 4).astype(np.float32))
    targets = rng.integers(0, w16.shape[0], 19)
    loss, dh = bf16_head.head_loss(lib, h, w16, targets, grad)
    monkeypatch.setattr(cpu_fused, "_STATE", [None, "off (test)"])
    want, wdh = bf16_head.head_loss(lib, h, w16, targets, grad)
    assert np.all(np.abs(loss - want) <= OPS * U32 * (1 + np.abs(want)))
    if grad:   # p rounded to bf16: an exp 1 ulp apart may round to the neighbouring bf16 value (2^-8)
        scale = np.max(np.abs(wdh), axis=1, keepdims=True)
        assert np.all(np.abs(dh - wdh) <= (2 * cpu_gemm.U_BF16 + OPS * U32) * scale)


@needs_fused
def test_attention_softmax_passes():
    """Fused causal softmax and its backward inside numpy_kernels' attention = NumPy's passes."""
    rng = np.random.default_rng(6)
    hd = ops.Heads(6, 2, 16, 0.25)
    segments = [(0, 1), (1, 17), (18, 40)]             # a one-token row, and uneven lengths
    q, k, v = (rng.standard_normal((58, n * 16)).astype(np.float32) for n in (6, 2, 2))
    (out, probs), (want, wprobs) = FUSED.attention(q, k, v, segments, hd, True), ops.attention(q, k, v, segments, hd, True)
    _close(out, want)
    for p, w in zip(probs, wprobs):
        _close(p, w, p.shape[-1])
        assert (p[w == 0] == 0).all()                   # masked keys get probability exactly 0
    do = rng.standard_normal(out.shape).astype(np.float32)
    for a, b in zip(FUSED.attention_back(do, q, k, v, wprobs, segments, hd),
                    ops.attention_back(do, q, k, v, wprobs, segments, hd)):
        _close(a, b, 40)


def test_a_compiler_refusing_the_wide_flags_builds_with_the_plain_ones(monkeypatch, tmp_path):
    """A compiler that rejects GCC's vector-width options (clang, an old GCC) still builds the kernels."""
    import shutil
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler")
    fake = tmp_path / "picky-cc"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in -mprefer-vector-width=*) '
                    f'echo "picky-cc: unknown option $a" >&2; exit 1;; esac; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_fused, "_STATE", [])
    fused, why = cpu_fused.load()
    assert fused is not None and why == "built"
    g = np.linspace(-5, 5, 64, dtype=np.float32).reshape(2, 32)
    _close(fused.swiglu(g, g, False)[0], ops.swiglu(g, g, False)[0])
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1        # the refused build left nothing
