"""bench/train_gpu.py cannot rot: its tiny shape runs the systems on CPU and prints the table."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tolerance import on_gpu, tol_abs, transient_s
from mlx_qlora.train.engines.dequant_gemm import on_cuda

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_shape_runs_every_system(tmp_path):
    import json

    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--shape", "tiny", "--batch", "4", "--steps", "2",
                        "--warmup", "1", "--systems", "mlx_qlora,mlx_qlora_dense,mlx_qlora_plain_ce,mlx_lm,torch", "--json", str(out)],
                       capture_output=True, text=True, timeout=transient_s(300), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]["tiny"]
    ours, dense, plain, lm = res["mlx_qlora"], res["mlx_qlora_dense"], res["mlx_qlora_plain_ce"], res["mlx_lm"]
    for system in ("mlx_qlora", "mlx_qlora_dense", "mlx_qlora_plain_ce", "mlx_lm"):
        assert res[system].get("tok_s", 0) > 0 and res[system]["peak_gib"] > 0, (system, res[system])
    # same random model, same tokens (4 x 64: dequant_gemm.MIN_ROWS rows, so "dense" is used): the
    # chunked and the plain loss agree, dequantize + GEMM and the quantized kernels too, mlx-lm's mean;
    # the bench's MLX model is float32 on CPU, bfloat16 on a GPU (its rounding bounds the losses there)
    import mlx.core as mx

    dt = mx.bfloat16 if on_gpu() else mx.float32
    assert abs(ours["loss"] - plain["loss"]) < tol_abs(1e-3, ours["loss"], dt)
    assert abs(ours["loss"] - dense["loss"]) < tol_abs(1e-3, ours["loss"], dt)    # dequantize + GEMM
    assert dense["base_matmul"] == "dense" and ours["base_matmul"] == ("dense" if on_cuda() else "quantized")
    assert abs(ours["loss"] - lm["loss"]) < tol_abs(1e-2, ours["loss"], dt)
    assert "torch" in res and ("tok_s" in res["torch"] or "skipped" in res["torch"])
    assert re.search(r"\| tiny \| mlx_qlora \| [\d,]+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \|", p.stdout), p.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--shape", "huge"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown shape/system 'huge'" in bad.stderr
