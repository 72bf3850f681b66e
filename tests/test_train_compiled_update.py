"""Beside the CPU engine, train() compiles gradient scaling, clipping and the AdamW update
(mlx_step.make_scale_clip / make_update: one fused kernel per LoRA tensor instead of ~10 MLX ops
each). Compiling fuses the same fp32 operations in the same order, so the adapter after several
clipped steps is the one the plain, op-by-op update gives, bit for bit."""
from __future__ import annotations

from functools import partial

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import numpy as np

from test_train import cfg, data_dir, tiny_q4, weights  # noqa: F401  (fixtures)
from mlx_qlora.train.engines import mlx_step
from mlx_qlora.train.loop import train


def test_cpu_engine_compiled_update_equals_the_plain_one(tiny_q4, data_dir, tmp_path, monkeypatch):
    run = partial(cfg, tiny_q4, data_dir, steps=4, eval_every=0, checkpoint_every=0, cpu_gemm="fp32")
    compiled = []
    real = mlx_step.make_update
    monkeypatch.setattr(mlx_step, "make_update", lambda *a: compiled.append(1) or real(*a))
    a = train(run(tmp_path / "a", **{"optim.max_grad_norm": 0.05}))     # a norm this small clips every step
    assert compiled == [1]
    with monkeypatch.context() as m:
        m.setattr(mlx_step, "make_update", lambda model, opt: partial(opt.update, model))
        real_sc = mlx_step.make_scale_clip
        m.setattr(mlx_step, "make_scale_clip", lambda max_norm, compiled: real_sc(max_norm, False))
        b = train(run(tmp_path / "b", **{"optim.max_grad_norm": 0.05}))
    wa, wb = (weights(tmp_path / x / "adapters.safetensors") for x in "ab")
    assert max(np.abs(wa[k]).max() for k in wa) > 0
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert a["train_loss"] == b["train_loss"]
