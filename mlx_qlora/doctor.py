"""``mlx_qlora doctor``: what this machine gives MLX, measured rather than assumed."""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass

from .model import blas as blas_loader


@dataclass
class DoctorReport:
    mlx_version: str
    device: str            # "cpu" or "gpu"
    backend: str           # "Metal", "CUDA" or "CPU"
    blas: str              # library bound for cblas_sgemm, or why none
    sgemm_gflops: float    # measured fp32 matmul throughput through MLX on the CPU
    embedded_model: str    # path of the embedded GGUF, or how to install it
    llama_cpp: str         # llama-cpp-python version, or why it is unavailable
    cpu: str = ""          # CPU model and the features llama.cpp and the BLAS care about
    llama_build: str = ""  # what llama-cpp-python was compiled with
    llama_bufts: str = ""  # whether llama.cpp's extra buffer types (AMX, repack) are used, and why

    def lines(self) -> list[str]:
        return [
            f"MLX            {self.mlx_version} on {self.device} ({self.backend})",
            f"BLAS           {self.blas}",
            f"sgemm          {self.sgemm_gflops:.1f} GFLOP/s (fp32 1024x1024 matmul on the CPU through MLX)",
            f"embedded model {self.embedded_model}",
            f"llama.cpp      {self.llama_cpp}",
            f"CPU            {self.cpu}",
            f"llama build    {self.llama_build}",
            f"llama bufts    {self.llama_bufts}",
        ]


def measure_sgemm_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 n x n matmul throughput on MLX's CPU stream (what the BLAS binding decides).

    Best of ``repeats``: the capability of the library, not how busy the machine is right now.
    """
    import mlx.core as mx

    a = mx.random.normal((n, n), stream=mx.cpu)
    b = mx.random.normal((n, n), stream=mx.cpu)
    mx.eval(a, b, mx.matmul(a, b, stream=mx.cpu))  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _backend() -> tuple[str, str]:
    import mlx.core as mx

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if getattr(mx, "metal", None) is not None and mx.metal.is_available():
        return device, "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return device, "CUDA"
    return device, "CPU"


def collect() -> DoctorReport:
    import mlx.core as mx

    from .model import llama_load
    from .model.cpu import cpu_info
    from .model.embedded import INSTALL_HINT, find_embedded_gguf

    device, backend = _backend()
    cpu = cpu_info()
    state = blas_loader.STATE
    blas = state.path if state.path else f"MLX's bundled BLAS ({state.reason})"
    gguf = find_embedded_gguf()
    try:
        import llama_cpp

        llama = f"llama-cpp-python {llama_cpp.__version__} importable"
    except ImportError:
        llama = "not installed (pip install llama-cpp-python; needed for llama.cpp tests and engine)"
    return DoctorReport(mlx_version=mx.__version__, device=device, backend=backend, blas=blas,
                        sgemm_gflops=measure_sgemm_gflops(),
                        embedded_model=str(gguf) if gguf else f"not installed ({INSTALL_HINT})",
                        llama_cpp=llama, cpu=f"{cpu.model}: {' '.join(cpu.features) or 'no AVX2/AVX-512/AMX/NEON'}",
                        llama_build=llama_load.llama_build(), llama_bufts=_bufts_line(llama_load, gguf))


def _bufts_line(llama_load, gguf) -> str:
    """The choice for the embedded model's type (what the demo and chat load) and the rule's reason."""
    wtype = llama_load.gguf_weight_type(gguf) if gguf else None
    choice = llama_load.choose_extra_bufts(wtype)
    return f"extra buffer types {choice.why}" + (f" for {wtype}" if wtype else "")


def run_doctor(probe_gguf: str | None = None) -> DoctorReport:
    if probe_gguf:
        from .errors import require
        from .model import llama_load
        from .model.embedded import embedded_gguf_path

        path = embedded_gguf_path() if probe_gguf == "embedded" else probe_gguf
        require(str(path).endswith(".gguf") and Path(path).is_file(),
                f"--probe-llama {probe_gguf!r}: not a GGUF file; pass a .gguf path or no value (the embedded model)")
        for wtype, v in llama_load.probe(path).items():
            print(f"probe          {Path(path).name} ({wtype}): {v['verdict']}")
    from .train.engines.cpu_gemm import doctor_lines   # the CPU training engine's GEMM path

    report = collect()
    for line in report.lines() + doctor_lines():
        print(line)
    return report
