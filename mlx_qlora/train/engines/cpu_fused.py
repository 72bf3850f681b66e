"""Fused elementwise kernels for the CPU engine's bf16 path: SwiGLU, RMSNorm, RoPE, the bf16
rounding, the attention softmax and the head's online-softmax chunk, each one vectorised pass
(``cpu_fused.c``), built here with the system C compiler.

Why: with the base's products on oneMKL's bf16 units, NumPy's multi-pass elementwise work was
most of a step (python bench/cpu_step_profile.py on a 2-core Xeon: SwiGLU 124, RMSNorm 72, RoPE
29 of 785 ms). The functions below take and return what ``numpy_kernels``' namesakes do, so
``numpy_engine`` swaps one module for the other on the bf16 path; the fp32 path keeps NumPy's
bits (``cpu_gemm: fp32``).

Build: ``cc -O3 -march=native`` into ``~/.cache/mlx_qlora/kernels/`` (the file's name hashes the
source, the flags, the compiler and the CPU's feature flags, so a copy built for another CPU is
never loaded), once per machine (~1 s). No compiler, or a failed build: ``load()`` returns None
with the reason and the engine keeps NumPy's kernels. ``MLX_QLORA_FUSED=off`` does that too.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .numpy_kernels import attention, attention_back, parallel, row_parts

F32 = np.float32
SOURCE = Path(__file__).with_name("cpu_fused.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
# GCC vectorises for Sapphire Rapids with 256-bit vectors by default; 512-bit ones run the
# exp-bound SwiGLU passes 1.3-1.5x faster there (one thread, 358 x 1536: 0.43 vs 0.57 ms forward)
WIDE = ["-mprefer-vector-width=512", "--param", "vect-partial-vector-usage=2"]
ENV_VAR = "MLX_QLORA_FUSED"
_STATE: list = []    # [module or None, reason] once tried


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_qlora" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> tuple[Path | None, str]:
    from ...model import cpu
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc}: {e}"
    flags = sorted(cpu.parse_cpuinfo(cpu.cpuinfo_text()).flags)
    # the wide-vector options are GCC's: a compiler that refuses them (clang, an old GCC) builds
    # with the plain flags instead
    why = ""
    for opts in ([FLAGS + WIDE] if "avx512f" in flags else []) + [FLAGS]:
        key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(opts), version, " ".join(flags)]).encode())
        lib = _cache_dir() / f"cpu_fused-{key.hexdigest()[:16]}.so"
        if lib.exists():
            return lib, "cached"
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *opts, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                os.replace(tmp, lib)      # atomic: another process building the same file is harmless
                return lib, "built"
            why = f"{cc} failed: {(done.stderr.strip().splitlines() or ['(no message)'])[-1]}"
        except (OSError, subprocess.SubprocessError) as e:
            why = f"{cc}: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, why


class Fused:
    """The kernels of one loaded library, with ``numpy_kernels``' signatures."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        p, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        sig = {"swiglu_fwd": [p, p, p, p, p, i, i, i], "swiglu_bwd": [p, p, p, p, p, p, p, p, i, i, i],
               "rms_fwd": [p, p, f, p, p, p, p, i, i, i], "rms_bwd": [p, p, p, p, p, i, i, i],
               "rope": [p, p, p, p, i, i, i, ctypes.c_int, f, i, i], "to_bf16": [p, p, i, i],
               "softmax_chunk": [p, i, p, p, p, p, i, i], "causal_softmax": [p, i, i, f, i, i],
               "softmax_back": [p, p, i, f, i, i]}
        self.c = {}
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
            self.c[name] = fn

    @staticmethod
    def _run(fn, args, rows: int, cols: int) -> None:
        parallel([lambda lo=lo, hi=hi: fn(*args, lo, hi) for lo, hi in row_parts(rows, cols)])

    # ------------------------------------------------------------------ RMSNorm
    def rms(self, x, w, eps, out16=None, to16=None):
        """(x / rms(x) * w, x / rms(x), 1 / rms(x)); ``out16``: also the first's bf16 bits."""
        x, w = _c(x), _c(w)
        y, n, r = np.empty(x.shape, F32), np.empty(x.shape, F32), np.empty((x.shape[0], 1), F32)
        self._run(self.c["rms_fwd"], (x.ctypes.data, w.ctypes.data, float(eps), y.ctypes.data, n.ctypes.data,
                                      r.ctypes.data, _ptr(out16), x.shape[1]), *x.shape)
        return y, n, r

    def rms_back(self, dy, w, n, r):
        dy, w, n, r = _c(dy), _c(w), _c(n), _c(r)
        out = np.empty(dy.shape, F32)
        self._run(self.c["rms_bwd"], (dy.ctypes.data, w.ctypes.data, n.ctypes.data, r.ctypes.data,
                                      out.ctypes.data, dy.shape[1]), *dy.shape)
        return out

    # ------------------------------------------------------------------ RoPE
    def rope(self, x, heads, cos, sin, dims, traditional, inverse=False):
        """``numpy_kernels.rope``: (tokens, heads * d), cos/sin (tokens, 1, dims / 2)."""
        x, cos, sin = _c(x), _c(cos), _c(sin)
        out = np.empty(x.shape, F32)
        hd = x.shape[1] // heads
        self._run(self.c["rope"], (x.ctypes.data, out.ctypes.data, cos.ctypes.data, sin.ctypes.data, heads, hd,
                                   dims, int(traditional), -1.0 if inverse else 1.0), *x.shape)
        return out

    # ------------------------------------------------------------------ SwiGLU
    def swiglu(self, g, u, keep_sigmoid, out16=None, to16=None):
        """(silu(g) * u, sigmoid(g) or None); ``out16``: also the result's bf16 bits."""
        g, u = _c(g), _c(u)
        out = np.empty(g.shape, F32)
        sig = np.empty(g.shape, F32) if keep_sigmoid else None
        self._run(self.c["swiglu_fwd"], (g.ctypes.data, u.ctypes.data, out.ctypes.data, _ptr(sig), _ptr(out16),
                                         g.shape[1]), *g.shape)
        return out, sig

    def swiglu_back(self, dact, g, u, sig, out16=None, to16=None):
        """(dL/dg, dL/du); ``out16``: a pair of uint16 arrays for their bf16 bits."""
        dact, g, u = _c(dact), _c(g), _c(u)
        sig = None if sig is None else _c(sig)
        dg, du = np.empty(g.shape, F32), np.empty(g.shape, F32)
        d16, e16 = (None, None) if out16 is None else out16
        self._run(self.c["swiglu_bwd"], (dact.ctypes.data, g.ctypes.data, u.ctypes.data, _ptr(sig), dg.ctypes.data,
                                         du.ctypes.data, _ptr(d16), _ptr(e16), g.shape[1]), *g.shape)
        return dg, du

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, segments, hd, keep_probs):
        """``numpy_kernels.attention`` with the scale, mask and softmax in one pass per row."""
        return attention(q, k, v, segments, hd, keep_probs, self._causal_softmax)

    def attention_back(self, do, q, k, v, probs, segments, hd):
        return attention_back(do, q, k, v, probs, segments, hd, self._softmax_back)

    def _causal_softmax(self, sc, rep, n, scale):      # on the calling thread: attention splits by segment
        assert sc.flags.c_contiguous and sc.dtype == F32
        self.c["causal_softmax"](sc.ctypes.data, n, sc.shape[-1], float(scale), 0, sc.size // sc.shape[-1])

    def _softmax_back(self, dp, p, scale):
        assert dp.flags.c_contiguous and p.flags.c_contiguous and dp.dtype == p.dtype == F32
        self.c["softmax_back"](dp.ctypes.data, p.ctypes.data, dp.shape[-1], float(scale), 0, dp.size // dp.shape[-1])

    # ------------------------------------------------------------------ online softmax (bf16_head)
    def softmax_chunk(self, L, m, s, alpha, p16=None):
        """One vocabulary chunk of ``bf16_head``'s online softmax, on the calling thread: the
        running max ``m`` (float32) and sum ``s`` (float64) updated in place, ``alpha`` = exp(m_old
        - m_new), ``p16`` = bf16 bits of exp(L - m_new) (all per row; ``L`` (rows, cols) fp32)."""
        assert L.flags.c_contiguous and L.dtype == F32 and m.dtype == F32 and s.dtype == np.float64
        assert alpha.dtype == F32 and (p16 is None or (p16.dtype == np.uint16 and p16.size == L.size))
        self.c["softmax_chunk"](L.ctypes.data, L.shape[1], m.ctypes.data, s.ctypes.data, alpha.ctypes.data,
                                _ptr(p16), 0, L.shape[0])

    # ------------------------------------------------------------------ bf16 rounding
    def round_bf16_into(self, x, out):
        """bf16 bits of the contiguous fp32 ``x`` into the uint16 ``out`` (``cpu_gemm.round_bf16_into``'s
        bits), on the calling thread."""
        assert x.flags.c_contiguous and out.flags.c_contiguous and out.dtype == np.uint16 and out.size == x.size
        self.c["to_bf16"](_c(x).ctypes.data, out.ctypes.data, 0, x.size)
        return out

    def to_bf16(self, x):
        """``cpu_gemm.to_bf16``'s bits, split over the kernel pool."""
        x = _c(x)
        out = np.empty(x.shape, np.uint16)
        cols = x.shape[-1] if x.ndim else 1
        rows = x.size // max(cols, 1)
        fn = self.c["to_bf16"]
        parallel([lambda lo=lo, hi=hi: fn(x.ctypes.data, out.ctypes.data, lo * cols, hi * cols)
                  for lo, hi in row_parts(rows, cols)])
        return out


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32)


def _ptr(a: np.ndarray | None):
    if a is None:
        return None
    assert a.flags.c_contiguous
    return a.ctypes.data


def load():
    """(Fused or None, why). Tried once per process; never raises."""
    if _STATE:
        return _STATE[0], _STATE[1]
    from ...model.blas import disabled_by
    fused, why = None, disabled_by(ENV_VAR)
    if why is None:
        try:
            path, why = _build()
            if path is not None:
                fused = Fused(ctypes.CDLL(str(path)), path)
        except (OSError, AttributeError) as e:
            fused, why = None, f"could not load the fused kernels: {e}"
    _STATE[:] = [fused, why]
    return fused, why
