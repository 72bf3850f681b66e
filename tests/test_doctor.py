"""doctor: a real CBLAS is bound on Linux and measured fast; the report names every component."""
import os
import sys

import pytest

from mlx_qlora.model import blas
from mlx_qlora.doctor import collect


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CBLAS binding is for Linux")
def test_real_blas_in_use_and_fast():
    report = collect()
    assert blas.STATE.reason == "loaded", blas.STATE.reason
    assert report.blas == blas.STATE.path and "blas" in report.blas.lower()
    assert report.sgemm_gflops > 20, report.sgemm_gflops  # reference BLAS gives ~1


def test_report_names_components():
    report = collect()
    text = "\n".join(report.lines())
    for word in ("MLX", "BLAS", "sgemm", "embedded model", "llama.cpp"):
        assert word in text
    assert report.backend in ("CPU", "Metal", "CUDA")


def test_blas_off_switch(tmp_path):
    import subprocess

    code = "import mlx_qlora, mlx_qlora.model.blas as b; print(b.STATE.reason)"
    # the environment inherited (a CUDA machine's library paths), only the switch set
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_QLORA_BLAS": "off"},
                         capture_output=True, text=True)
    assert "disabled" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-c", "import mlx.core, mlx_qlora, mlx_qlora.model.blas as b; print(b.STATE.reason)"],
                         capture_output=True, text=True)
    assert "imported before" in out.stdout, out.stderr
