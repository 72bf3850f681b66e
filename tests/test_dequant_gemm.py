"""dequant_gemm (train/engines/dequant_gemm.py): a 4-bit product as dequantize + dense matmul gives the
quantized kernel's values and gradients, keeps no dense weight between forward and backward (peak
memory), and the GPU step with it on gives the same losses and LoRA gradients (CPU kernels off)."""
from __future__ import annotations

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import pytest

from test_cpu_engine import model_for, rel_err
from test_mlx_step import check_device_step
from tolerance import on_gpu, tol
from mlx_qlora.train.engines import dequant_gemm, mlx_cpu_kernels, mlx_step
from mlx_qlora.train.config import LoraConfig, TrainConfig
from mlx_qlora.errors import UserError
from mlx_qlora.train.loop import grad_checkpoint, make_step_fns, output_head


def _qlinear(d_in, d_out, seed=0, bias=False):
    mx.random.seed(seed)
    q = nn.QuantizedLinear.from_linear(nn.Linear(d_in, d_out, bias=bias), group_size=64, bits=4)
    mx.eval(q.parameters())
    return q


@pytest.mark.parametrize("shape", [(300, 128), (2, 150, 128)])
def test_values_and_gradient_equal_the_quantized_kernel(shape):
    q = _qlinear(128, 96)
    x = mx.random.normal(shape)
    cot = mx.random.normal(shape[:-1] + (96,))

    def ref(x):
        return mx.sum(q(x) * cot)

    def dense(x):
        return mx.sum(dequant_gemm.matmul(x, q) * cot)

    (l0, g0), (l1, g1) = mx.value_and_grad(ref)(x), mx.value_and_grad(dense)(x)
    assert rel_err(dequant_gemm.matmul(x, q), q(x)) < tol(1e-5)
    assert rel_err(l1, l0) < tol(1e-5) and rel_err(g1, g0) < tol(1e-5)
    l2, g2 = mx.compile(mx.value_and_grad(dense))(x)
    assert rel_err(l2, l0) < tol(1e-5) and rel_err(g2, g0) < tol(1e-5)
    # a half-precision activation stays in its dtype, in both directions
    xh = x.astype(mx.bfloat16)
    gh = mx.grad(lambda x: mx.sum(dequant_gemm.matmul(x, q).astype(mx.float32) * cot))(xh)
    assert dequant_gemm.matmul(xh, q).dtype == mx.bfloat16 and gh.dtype == mx.bfloat16
    assert rel_err(gh.astype(mx.float32), g0) < tol(1e-5, mx.bfloat16)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sliced_head_products_equal_the_quantized_kernel(dtype, monkeypatch):
    """A 1,000-row "vocabulary" dequantized 96 rows at a time (11 slices, the last short), both
    directions, against the same inputs in float32 (dequantized weight, fp32 matmul); bf16
    activations keep their dtype (the x @ W sums run in fp32). In bf16 this is 7x closer to the
    fp32 result than MLX's CPU quantized_matmul (0.0046 vs 0.033 of the largest output)."""
    q = _qlinear(128, 1000, seed=3)
    if dtype != mx.float32:
        q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
    arrays, layout = dequant_gemm.quant_args(q)
    monkeypatch.setattr(dequant_gemm, "SLICE_BYTES", 96 * 128 * dtype.size)
    x, p = mx.random.normal((70, 128)).astype(dtype), mx.random.normal((70, 1000)).astype(dtype)
    fwd = dequant_gemm.sliced_matmul(x, arrays, layout, transpose=True)
    back = dequant_gemm.sliced_matmul(p, arrays, layout, transpose=False)
    w32 = mx.dequantize(*(a.astype(mx.float32) if a.dtype == dtype and dtype != mx.float32 else a for a in arrays),
                        group_size=64, bits=4)
    ref_f, ref_b = x.astype(mx.float32) @ w32.T, p.astype(mx.float32) @ w32
    assert fwd.shape == (70, 1000) and back.shape == (70, 128) and fwd.dtype == back.dtype == dtype
    assert rel_err(fwd.astype(mx.float32), ref_f.astype(mx.float32)) < tol(1e-5, dtype)
    assert rel_err(back.astype(mx.float32), ref_b.astype(mx.float32)) < tol(1e-5, dtype)


def test_applies_only_when_on_and_from_min_rows():
    x_small, x_big = mx.zeros((2, 100, 64)), mx.zeros((3, 100, 64))
    assert not dequant_gemm.applies(x_big)
    with dequant_gemm.enabled():
        assert dequant_gemm.applies(x_big) and not dequant_gemm.applies(x_small)   # 300 vs 200 rows
        with dequant_gemm.enabled(False):
            assert not dequant_gemm.applies(x_big)
        assert dequant_gemm.applies(x_big)
    assert not dequant_gemm.applies(x_big)
    assert dequant_gemm.resolve("dense") and not dequant_gemm.resolve("quantized")
    assert dequant_gemm.resolve("auto") == (mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available())


def test_no_dense_weight_is_kept_for_backward():
    """Peak memory of forward + backward through 12 layers: the quantized kernel's, plus at most
    three dense weights in flight. Differentiating a plain ``x @ dequantize(W).T`` keeps all 12
    dense weights for backward and fails the same bound (checked here, so the bound can fail)."""
    d, n_layers, rows = 1024, 12, 512
    # float32 on CPU; bf16 on a GPU, the dtype a GPU step runs (and CUDA's fast quantized kernel)
    dt = mx.bfloat16 if on_gpu() else mx.float32
    layers = [_qlinear(d, d, seed=i) for i in range(n_layers)]
    for q in layers:
        q.scales, q.biases = q.scales.astype(dt), q.biases.astype(dt)
    dense_w = d * d * dt.size                                     # 4 MiB each in float32
    x0 = mx.random.normal((rows, d)).astype(dt)
    mx.eval(x0, [q.parameters() for q in layers])

    def net(how):
        def f(x):
            for q in layers:
                if how == "quantized":
                    x = q(x)
                elif how == "dense":
                    x = dequant_gemm.matmul(x, q)
                else:
                    x = x @ mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4).T
                x = mx.tanh(x)
            return mx.sum(x.astype(mx.float32))
        return mx.grad(f)

    def peak(how, compiled):
        g = mx.compile(net(how)) if compiled else net(how)
        mx.eval(g(x0))                       # compile / warm caches first
        mx.reset_peak_memory()
        mx.eval(g(x0))
        return mx.get_peak_memory()

    for compiled in (False, True):
        bound = peak("quantized", compiled) + 3 * dense_w
        assert peak("dense", compiled) <= bound, compiled
        assert peak("kept", compiled) > bound, compiled      # the bound does catch kept weights


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("qwen2", "all-linear"), ("llama", "q_proj,v_proj")])
def test_device_step_with_dense_base_matches_todays_path(request, arch, targets, monkeypatch):
    """The GPU step with dequantize + GEMM (adapted and untargeted projections, the tied or untied
    head) == the gather-based uncompiled step, compiled and not; and it does take that route."""
    monkeypatch.setattr(dequant_gemm, "MIN_ROWS", 1)            # the test batch has 3 x 64 rows
    lora = LoraConfig(rank=4, alpha=8, layers="all", targets=targets)
    model = model_for(request.getfixturevalue(f"tiny_hf_{arch}"), 4, lora)
    calls, dequantized = [], []
    real, real_dq = dequant_gemm.matmul, dequant_gemm.dequantized
    monkeypatch.setattr(dequant_gemm, "matmul", lambda x, q: calls.append(q) or real(x, q))
    monkeypatch.setattr(dequant_gemm, "dequantized", lambda a, *r: dequantized.append(a[0].shape) or real_dq(a, *r))
    check_device_step(model, dense=True)
    if targets == "all-linear" and arch == "llama":       # and with checkpointed blocks (recomputed dense)
        grad_checkpoint(model)
        check_device_step(model, dense=True)
    head = output_head(model)
    projections = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear) and m is not head]
    assert {id(q) for q in calls} == {id(q) for q in projections}     # every 4-bit projection went dense
    assert head.weight.shape in dequantized                           # and the head (one slice here)


def test_make_step_fns_reads_base_matmul_and_the_config_checks_it(tiny_hf_llama, monkeypatch):
    seen = []
    real = mlx_step.make_device_step
    monkeypatch.setattr(mlx_step, "make_device_step", lambda *a, **k: seen.append(k["dense"]) or real(*a, **k))
    with mlx_cpu_kernels.disabled():
        for mode in ("dense", "quantized", "auto"):
            make_step_fns(model_for(tiny_hf_llama, 4), use_cpu_engine=False, say=lambda *_: None, base_matmul=mode)
    assert seen == [True, False, dequant_gemm.on_cuda()]
    with pytest.raises(UserError, match="base_matmul='fast': use one of auto, quantized, dense"):
        TrainConfig(model="m", data={"train": "t.jsonl"}, base_matmul="fast")
