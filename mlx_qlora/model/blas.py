"""Load a real CBLAS before ``mlx.core`` is imported.

MLX's Linux CPU wheel resolves ``cblas_sgemm`` against the netlib *reference* BLAS it ships
(~1 GFLOP/s on a 2-core x86 box). If a real CBLAS is loaded first with ``RTLD_GLOBAL``, the
dynamic linker binds MLX's calls to it instead (~50 GFLOP/s with OpenBLAS here). That only
works when it happens before the first ``import mlx.core``, which is why the package
``__init__`` calls :func:`load` and nothing else.

Environment:
  MLX_QLORA_BLAS=off          do nothing (keep MLX's own BLAS)
  MLX_QLORA_BLAS=/path/lib.so load exactly this library (error if it lacks cblas_sgemm)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

ENV_VAR = "MLX_QLORA_BLAS"

# Searched in order; the first that loads and exports cblas_sgemm wins. MKL first: where a
# user installed it, they want it. Debian/Ubuntu paths cover libopenblas0-pthread/-openmp.
_CANDIDATES = (
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
)


@dataclass
class BlasState:
    path: str | None = None      # library bound with RTLD_GLOBAL, None when none was loaded
    reason: str = "not tried"    # why this state: loaded / disabled / too late / none found
    handle: object = None


STATE = BlasState()


def _find_library_names() -> list[str]:
    extra = []
    for name in ("mkl_rt", "openblas"):
        found = ctypes.util.find_library(name)
        if found:
            extra.append(found)
    return list(_CANDIDATES) + extra


def _try(path: str):
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return lib if hasattr(lib, "cblas_sgemm") else None


def disabled_by(var: str) -> str | None:
    """'disabled by VAR=value' when the environment variable ``var`` switches a native library
    off (off, 0, none, false, no; any case), else None. Shared by every such switch."""
    choice = os.environ.get(var, "").strip()
    return f"disabled by {var}={choice}" if choice.lower() in ("off", "0", "none", "false", "no") else None


def load() -> BlasState:
    """Bind a real CBLAS globally (idempotent). Never raises: MLX works without it, slowly."""
    if STATE.reason != "not tried":
        return STATE
    choice = os.environ.get(ENV_VAR, "").strip()
    off = disabled_by(ENV_VAR)
    if off:
        STATE.reason = off
        return STATE
    if sys.platform == "darwin":
        STATE.reason = "macOS: MLX uses Accelerate"
        return STATE
    if "mlx.core" in sys.modules:
        STATE.reason = "mlx.core was imported before mlx_qlora; import mlx_qlora first"
        return STATE
    paths = [choice] if choice else _find_library_names()
    for path in paths:
        lib = _try(path)
        if lib is not None:
            STATE.path, STATE.handle, STATE.reason = path, lib, "loaded"
            return STATE
    STATE.reason = (f"{choice} could not be loaded or lacks cblas_sgemm" if choice else
                    "no CBLAS found; install one (Debian: apt-get install libopenblas0-pthread)")
    return STATE
