"""The CPU engine's GEMM path for the frozen base's products: fp32 BLAS or bf16 operands.

Why: CPUs with bf16 units (AVX512-BF16, AMX-BF16 tiles: Cooper Lake, Sapphire Rapids and later)
multiply bf16 several times faster than fp32 (measured here, 2 Sapphire-Rapids-class
cores: ~400-700 GFLOP/s bf16 vs ~100-150 fp32 on the engine's 576 x 1536 shapes). The frozen base
weight of each projection and the activation (forward) or output gradient (backward, the input
gradient) are rounded to bf16; the products accumulate in fp32 and come back as fp32. LoRA
factors, their products, the optimizer state, norms, softmax and the loss stay fp32.

Library: Intel oneMKL's ``cblas_gemm_bf16bf16f32`` (the ``mkl`` wheel, extra ``cpu-bf16``),
loaded privately (RTLD_LOCAL) so MLX and NumPy keep the BLAS they bind today. OpenBLAS has
``cblas_sbgemm`` only when built with BUILD_BFLOAT16, which Debian 12's 0.3.21 and the
scipy-openblas wheels (0.3.31, 0.3.34) are not.

Path (config key ``cpu_gemm``): ``fp32`` (the engine exactly as before), ``bf16`` (error when no
library), ``auto`` (bf16 on an Intel CPU whose /proc/cpuinfo lists amx_bf16 or avx512_bf16, when
the library loads; else fp32). AMD's Zen 4+ has avx512_bf16 too, but oneMKL's speed there is
unmeasured, so auto keeps fp32 on it (``bf16`` forces the path).

Precision (the bound tests/test_cpu_gemm.py checks): bf16 keeps 8 significant bits, so rounding
to nearest gives a relative error of at most u = 2^-8 per operand. A product of two rounded
operands is a*b*(1+d1)(1+d2), |d1|, |d2| <= u, off by at most (2u + u^2)|a||b|; fp32 accumulation
of K terms adds at most K * 2^-24 * sum|a||b|. So each element of C = A @ B obeys
|C_bf16 - C| <= (2u + u^2 + K * 2^-24) * (|A| @ |B|).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ...errors import require
from ...model import cpu
from ...model.blas import disabled_by
from ..config import CPU_GEMMS as PATHS
from . import cpu_fused, numpy_kernels

BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo names of the bf16 units
U_BF16 = 2.0 ** -8                         # unit roundoff of bf16 (8 significant bits)
U_FP32 = 2.0 ** -24
ENV_VAR = "MLX_QLORA_BF16_BLAS"            # off, or the path of a libmkl_rt to use
# MklBf16.matmul splits an output at least this many times wider than tall by columns, not rows:
# oneMKL packs its b operand on every call, and a column split packs each part once instead of
# every thread packing all of b (2 cores, 360 x 576 @ 576 x 1536 bf16: ~10-20% faster)
COL_SPLIT = 2
# CBLAS enum values (cblas.h): row-major, no transpose, transpose
_ROW, _N, _T = 101, 111, 112


def gemm_bound(k: int) -> float:
    """Elementwise error bound of a bf16 GEMM of inner size ``k``, relative to |A| @ |B|."""
    return 2 * U_BF16 + U_BF16 ** 2 + k * U_FP32


# ------------------------------------------------------------------ the CPU
# (read by ``model.cpu``, the one /proc/cpuinfo reader; ``text`` = a cpuinfo text, for simulated CPUs)
def cpuinfo_text() -> str:
    return cpu.cpuinfo_text()


def _cpu(text: str | None) -> cpu.CpuInfo:
    return cpu.parse_cpuinfo(cpuinfo_text() if text is None else text)


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or ``text`` in its format)."""
    return _cpu(text).flags


def cpu_vendor(text: str | None = None) -> str:
    return _cpu(text).vendor


def cpu_summary(text: str | None = None) -> str:
    """'<model name> (avx2 avx512f amx_bf16 ...)': the name and the flags that pick the GEMM path."""
    info = _cpu(text)
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in info.flags]
    return f"{info.model} ({' '.join(shown) or 'no AVX2/AVX-512/AMX'})"


# ------------------------------------------------------------------ the library
class MklBf16:
    """oneMKL's bf16 x bf16 -> fp32 GEMM, through ctypes."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        f = lib.cblas_gemm_bf16bf16f32
        f.restype = None
        p, i = ctypes.c_void_p, ctypes.c_int
        f.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
        self._gemm = f
        sg = lib.cblas_sgemm
        sg.restype = None
        sg.argtypes = f.argtypes
        self._sgemm = sg
        version = ctypes.create_string_buffer(256)
        lib.mkl_get_version_string(version, 256)
        text = version.value.decode(errors="replace")
        found = re.search(r"Version (\S+)", text)      # "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product ..."
        self.version = f"oneMKL {found.group(1).split('-')[0]}" if found else "oneMKL"

    def matmul(self, a: np.ndarray, b: np.ndarray, transpose_b: bool) -> np.ndarray:
        """fp32 ``a @ b`` (``a @ b.T`` with ``transpose_b``) of C-contiguous bf16 (uint16) matrices.

        oneMKL runs sequential; the rows of ``a`` are split over the kernel pool's threads, which
        wait on futures rather than spin (an OpenMP team spinning beside NumPy's OpenBLAS threads
        took 5x the CPU time per token on 2 shared cores)."""
        m, k = a.shape
        n = b.shape[0] if transpose_b else b.shape[1]
        assert b.shape[1 if transpose_b else 0] == k and a.dtype == b.dtype == np.uint16
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        c = np.empty((m, n), np.float32)
        tb, ldb, pa, pb, pc = _T if transpose_b else _N, b.shape[1], a.ctypes.data, b.ctypes.data, c.ctypes.data

        def rows(lo, hi):   # ctypes releases the GIL for the call
            self._gemm(_ROW, _N, tb, hi - lo, n, k, 1.0, pa + 2 * lo * k, k, pb, ldb, 0.0, pc + 4 * lo * n, n)

        def cols(lo, hi):   # columns lo:hi of c: rows of b (columns without transpose_b)
            self._gemm(_ROW, _N, tb, m, hi - lo, k, 1.0, pa, k, pb + 2 * lo * (k if transpose_b else 1), ldb, 0.0,
                       pc + 4 * lo, n)

        if n >= COL_SPLIT * m:   # wide outputs: each thread packs only its share of b
            parts = [(lo // 64 * 64, hi // 64 * 64 if hi < n else n) for lo, hi in numpy_kernels.row_parts(n, m * k // 64)]
            numpy_kernels.parallel([lambda lo=lo, hi=hi: cols(lo, hi) for lo, hi in parts if hi > lo])
        else:
            numpy_kernels.parallel([lambda lo=lo, hi=hi: rows(lo, hi) for lo, hi in numpy_kernels.row_parts(m, n * k // 64)])
        return c

    def gemm(self, a: np.ndarray, b: np.ndarray, transpose_b: bool, c: np.ndarray, beta: float = 0.0) -> np.ndarray:
        """``c = a @ b`` (``a @ b.T``) + ``beta * c`` into the C-contiguous fp32 ``c``, on the calling
        thread (for callers that split the work over threads themselves)."""
        m, k = a.shape
        n = b.shape[0] if transpose_b else b.shape[1]
        assert b.shape[1 if transpose_b else 0] == k and a.dtype == b.dtype == np.uint16
        assert c.shape == (m, n) and c.dtype == np.float32 and c.flags.c_contiguous
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        self._gemm(_ROW, _N, _T if transpose_b else _N, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, b.shape[1],
                   beta, c.ctypes.data, n)
        return c


    def sgemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, ta: bool = False, tb: bool = False,
              alpha: float = 1.0, beta: float = 0.0, serial: bool = False) -> np.ndarray:
        """fp32 ``c = alpha * op(a) @ op(b) + beta * c`` (op: transpose with ``ta`` / ``tb``) through
        oneMKL's sgemm, ``c`` written in place (a new array when None). For the bf16 path's LoRA
        products: beta = 1 adds ``x_a @ B`` into the projection's output without a temporary and a
        second pass, which NumPy's ``y += xa @ b`` takes. Operands may be row-strided views (unit
        column stride); the output is split over the kernel pool by rows (by columns when ``ta``:
        then the rows of a product are its inner sum), or not with ``serial``."""
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        n = b.shape[0] if tb else b.shape[1]
        assert (b.shape[1] if tb else b.shape[0]) == k
        if c is None:
            c = np.empty((m, n), np.float32)
        for t in (a, b, c):
            assert t.dtype == np.float32 and t.ndim == 2 and (t.strides[1] == 4 or t.shape[1] == 1)
        assert c.shape == (m, n)
        lda, ldb, ldc = (max(t.strides[0] // 4, t.shape[1]) for t in (a, b, c))
        pa, pb, pc = a.ctypes.data, b.ctypes.data, c.ctypes.data
        ops = (_ROW, _T if ta else _N, _T if tb else _N)

        def block(lo, hi):
            if ta:    # columns lo:hi of c: columns of b (rows when tb)
                self._sgemm(*ops, m, hi - lo, k, alpha, pa, lda, pb + 4 * lo * (ldb if tb else 1), ldb, beta,
                            pc + 4 * lo, ldc)
            else:     # rows lo:hi of c: rows of a
                self._sgemm(*ops, hi - lo, n, k, alpha, pa + 4 * lo * lda, lda, pb, ldb, beta, pc + 4 * lo * ldc, ldc)

        parts = [(0, n if ta else m)] if serial else \
            numpy_kernels.row_parts(n, m * k // 16) if ta else numpy_kernels.row_parts(m, n * k // 16)
        numpy_kernels.parallel([lambda lo=lo, hi=hi: block(lo, hi) for lo, hi in parts])
        return c

    def sgemm_tn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """fp32 ``a.T @ b`` for tall ``a`` (tokens, i) and ``b`` (tokens, r) with a short output (a
        LoRA factor's gradient): the sum over tokens split over the kernel pool, partial products added
        (a column split would make every thread read all of ``a``)."""
        parts = numpy_kernels.row_parts(a.shape[0], a.shape[1] * b.shape[1] // 16)
        got = numpy_kernels.parallel([lambda lo=lo, hi=hi: self.sgemm(a[lo:hi], b[lo:hi], ta=True, serial=True)
                                      for lo, hi in parts])
        for g in got[1:]:
            got[0] += g
        return got[0]


_LIB: list = []     # [MklBf16 | None, reason] once tried


def _candidates() -> list[str]:
    # the mkl wheel puts its libraries in <prefix>/lib (not on the loader's path)
    here = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")), reverse=True)
    found = ctypes.util.find_library("mkl_rt")
    return here + ([found] if found else [])


def load_library():
    """(MklBf16 or None, why). Tried once; never raises."""
    if _LIB:
        return _LIB[0], _LIB[1]
    choice = os.environ.get(ENV_VAR, "").strip()
    lib, why = None, "no oneMKL found (pip install mkl, or mlx_qlora[cpu-bf16])"
    off = disabled_by(ENV_VAR)
    if off:
        why = off
    elif sys.platform == "darwin":
        why = "macOS (MLX uses Metal; no oneMKL)"
    else:
        for path in [choice] if choice else _candidates():
            try:
                # sequential: MatMul threads come from the kernel pool (see MklBf16.matmul), so no
                # OpenMP runtime is loaded beside NumPy's OpenBLAS threads
                os.environ.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
                cdll = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
                if not hasattr(cdll, "cblas_gemm_bf16bf16f32"):
                    why = f"{path} lacks cblas_gemm_bf16bf16f32 (oneMKL 2021 or newer has it)"
                    continue
                lib, why = MklBf16(cdll, path), "loaded"
                break
            except OSError as e:
                why = f"{path}: {e}"
    _LIB[:] = [lib, why]
    return lib, why


_CONTROLLER: list = []


def other_blas_serial():
    """Context in which the other BLAS libraries (NumPy's OpenBLAS, the one MLX binds) run on one
    thread, via threadpoolctl (nothing when it is missing). Why: on the bf16 path the large
    products are oneMKL's, split over the kernel pool; an OpenBLAS worker left spinning after a
    small LoRA product takes a core from them (2 cores: 448 vs 377 tok/s on the bench's default row)."""
    try:
        import threadpoolctl
    except ImportError:
        return nullcontext()
    if not _CONTROLLER:
        _CONTROLLER.append(threadpoolctl.ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


# ------------------------------------------------------------------ the choice
@dataclass(frozen=True)
class GemmChoice:
    path: str        # "fp32" or "bf16"
    reason: str      # one line: why this path

    @property
    def bf16(self) -> bool:
        return self.path == "bf16"


def choose(key: str = "auto", flags: frozenset[str] | None = None, library=False,
           vendor: str | None = None) -> GemmChoice:
    """The GEMM path for ``cpu_gemm=key`` on a CPU with ``flags`` and ``vendor`` (default: this
    one's) given ``library`` (default: ``load_library()``; None: no library)."""
    require(key in PATHS, f"cpu_gemm={key!r}: use one of {', '.join(PATHS)}")
    if key == "fp32":
        return GemmChoice("fp32", "fp32 BLAS (cpu_gemm=fp32)")
    lib, why = load_library() if library is False else (library, "loaded" if library else "no library (given)")
    if key == "bf16":
        require(lib is not None, f"cpu_gemm=bf16: no bf16 GEMM library ({why}); "
                                 f"install oneMKL (pip install mkl) or use cpu_gemm=fp32")
        return GemmChoice("bf16", f"bf16 GEMMs, fp32 accumulation ({_lib_name(lib)}; cpu_gemm=bf16)")
    flags = cpu_flags() if flags is None else flags
    units = [f for f in BF16_FLAGS if f in flags]
    if not units:
        return GemmChoice("fp32", "fp32 BLAS (cpu_gemm=auto: this CPU has no bf16 units, "
                                  "amx_bf16/avx512_bf16)")
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor != "GenuineIntel":
        return GemmChoice("fp32", f"fp32 BLAS (cpu_gemm=auto: oneMKL's bf16 GEMMs are measured on Intel CPUs "
                                  f"only, this is {vendor}; cpu_gemm=bf16 forces them)")
    if lib is None:
        return GemmChoice("fp32", f"fp32 BLAS (cpu_gemm=auto: the CPU has {' '.join(units)} but {why})")
    return GemmChoice("bf16", f"bf16 GEMMs, fp32 accumulation ({_lib_name(lib)}; cpu_gemm=auto, "
                              f"CPU has {' '.join(units)})")


def _lib_name(lib) -> str:
    return getattr(lib, "version", None) or "oneMKL"


def doctor_lines() -> list[str]:
    """What ``mlx_qlora doctor`` prints about the CPU engine's GEMM path (as cpu_gemm=auto picks it);
    the CPU and its features are doctor's own line (``model.llama_load.cpu_info``)."""
    return [f"CPU GEMMs      {choose('auto').reason}"]


# ------------------------------------------------------------------ bf16 values
CONVERT_BLOCK = 1 << 15     # elements per pass (128 KiB of fp32): the five passes stay in L2


def _round_rows(u: np.ndarray, out: np.ndarray) -> None:
    step = max(1, CONVERT_BLOCK // u.shape[1])
    for lo in range(0, u.shape[0], step):
        ub = u[lo:lo + step]
        r = ub >> 16
        r &= 1
        r += 0x7FFF                  # round to nearest, ties to even: add 0x7FFF + the kept lsb
        r += ub                      # (wraps only for NaN payloads >= 0x7FFF8001, fixed below)
        r >>= 16
        out[lo:lo + step] = r


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounded to nearest even; NaN stays NaN. In the calling thread
    and the kernel pool (no MLX stream hand-off per call); large matrices split by rows."""
    x = np.ascontiguousarray(x, np.float32)
    fused = cpu_fused.load()[0]
    if fused is not None and x.ndim:          # one vectorised pass, the same bits (tests/test_cpu_fused.py)
        return fused.to_bf16(x)
    u = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    out = np.empty(u.shape, np.uint16)
    u = u.view(np.uint32)
    numpy_kernels.parallel([lambda lo=lo, hi=hi: _round_rows(u[lo:hi], out[lo:hi])
                            for lo, hi in numpy_kernels.row_parts(*u.shape)])
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(np.sum(x, dtype=np.float32))    # one read pass; NaN/inf are rare
    if not finite:
        out[np.isnan(u.view(np.float32))] = 0x7FC0
    return out.reshape(x.shape)


def round_bf16_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``to_bf16`` of the fp32 ``x`` (contiguous rows) into the uint16 ``out`` of its shape, on the
    calling thread: for blocks a caller already holds in cache (NumPy's bit passes measured faster
    here than ml_dtypes' scalar bfloat16 cast: 0.30 vs 0.36 ms per 356 x 1024)."""
    fused = cpu_fused.load()[0]
    if fused is not None and x.flags.c_contiguous and out.flags.c_contiguous:
        return fused.round_bf16_into(x, out)
    u = x.reshape(-1, x.shape[-1]).view(np.uint32)
    _round_rows(u, out.reshape(u.shape))
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(np.sum(x, dtype=np.float32)):
            out[np.isnan(x)] = 0x7FC0
    return out


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> fp32 (exact)."""
    return (b.astype(np.uint32) << 16).view(np.float32)
