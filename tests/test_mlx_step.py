"""The GPU path's step (train/engines/mlx_step.py) against today's MLX-autodiff step, on CPU with the CPU
kernels off: chunked cross-entropy == plain cross-entropy (loss and gradient), the compiled step ==
the uncompiled one == the gather-based step, checkpointing changes nothing, bf16 LoRA compute."""
from __future__ import annotations

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from test_cpu_engine import batch, model_for, reference, rel_err
from test_train import cfg, data_dir, tiny_q4, weights  # noqa: F401  (fixtures)
from tolerance import tol
from mlx_qlora.train import memory_plan
from mlx_qlora.train.engines import mlx_cpu_kernels, mlx_step
from mlx_qlora.train.config import LoraConfig
from mlx_qlora.train.lora import LoRALinear
from mlx_qlora.train.loop import grad_checkpoint, make_step_fns, output_head


@pytest.mark.parametrize("quantized", [True, False])
def test_chunked_cross_entropy_matches_plain(quantized):
    mx.random.seed(1)
    h = mx.random.normal((300, 64))
    lin = nn.Linear(64, 500, bias=False)
    head = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4) if quantized else lin
    t = mx.random.randint(0, 500, (300,))
    w = (mx.random.uniform(shape=(300,)) > 0.3).astype(mx.float32)    # a loss mask as weights

    def plain(h):
        ce = nn.losses.cross_entropy(head(h).astype(mx.float32), t, reduction="none")
        return mx.sum(ce * w)

    def chunked(h):
        return mlx_step.chunked_cross_entropy(h, head, t, w, rows=64)   # 5 chunks, the last short

    (l0, g0), (l1, g1) = mx.value_and_grad(plain)(h), mx.value_and_grad(chunked)(h)
    assert rel_err(l1, l0) < tol(1e-5) and rel_err(g1, g0) < tol(1e-4)
    off = np.array(w) == 0
    assert np.abs(np.array(g1)[off]).max() == 0.0 and np.abs(np.array(g1)).max() > 0
    assert rel_err(mlx_step.chunked_cross_entropy(h, head, t, w, with_grad=False, rows=64), l0) < tol(1e-5)
    # under mx.compile too
    (l2, g2) = mx.compile(mx.value_and_grad(chunked))(h)
    assert rel_err(l2, l0) < tol(1e-5) and rel_err(g2, g0) < tol(1e-4)


def test_chunked_cross_entropy_in_bf16_keeps_bf16_gradients():
    """A bf16 model: bf16 logits per chunk, float32 softmax, dL/dh back in bf16 (an fp32 cotangent
    would promote the whole backward of the model to fp32)."""
    mx.random.seed(2)
    h, lin = mx.random.normal((200, 64)), nn.Linear(64, 300, bias=False)
    t, w = mx.random.randint(0, 300, (200,)), mx.ones((200,))
    ref_l, ref_g = mx.value_and_grad(lambda h: mlx_step.chunked_cross_entropy(h, lin, t, w, rows=64))(h)
    lin.set_dtype(mx.bfloat16)
    l, g = mx.value_and_grad(lambda h: mlx_step.chunked_cross_entropy(h, lin, t, w, rows=64))(h.astype(mx.bfloat16))
    assert l.dtype == mx.float32 and g.dtype == mx.bfloat16
    assert rel_err(l, ref_l) < tol(1e-5, mx.bfloat16) and rel_err(g.astype(mx.float32), ref_g) < tol(1e-4, mx.bfloat16)


def test_chunk_rows_bound_the_logits():
    assert mlx_step.chunk_rows(128_256, 2048) * 128_256 <= mlx_step.CE_CHUNK_ELEMENTS
    assert mlx_step.chunk_rows(300, 100) == 100 and mlx_step.chunk_rows(10 ** 9, 4096) == mlx_step.MIN_CHUNK_ROWS


def _device_step(model, compile=True):
    return mlx_step.make_device_step(model, output_head(model), compile=compile)


def check_device_step(model, dense: bool = False) -> None:
    """The device step, eager and compiled, == the gather-based uncompiled step (loss 1e-5, every
    LoRA gradient 1e-4 relative) on a batch of 3 rows whose longest (39) is padded to 64."""
    b = batch(3, lengths=(9, 5, 40))
    ref_loss, ref = reference(model, b)
    with mlx_cpu_kernels.disabled():
        for compile in (False, True):
            grad_fn, eval_fn = mlx_step.make_device_step(model, output_head(model), compile=compile, dense=dense)
            loss, g = grad_fn(b, (0, 0, 0))
            g = dict(tree_flatten(g))
            assert abs(loss - ref_loss) / ref_loss < tol(1e-5), compile
            assert set(g) == set(ref) and len(g) > 0
            for k in ref:
                assert rel_err(g[k], ref[k]) < tol(1e-4), (compile, k)
            assert abs(eval_fn(b) - ref_loss) / ref_loss < tol(1e-5)


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("qwen2", None)])
def test_device_step_matches_todays_path(request, arch, bits):
    """Padded rows + weights + chunked loss + mx.compile == the gather-based uncompiled step."""
    check_device_step(model_for(request.getfixturevalue(f"tiny_hf_{arch}"), bits))


def test_compiled_step_keeps_dropout_and_checkpointing_changes_nothing(tiny_hf_llama):
    """Same (seed, step) -> same dropout masks compiled or not; another seed draws other masks (the
    random state is captured by mx.compile, not frozen into it). Checkpointed blocks (recomputed
    in backward; no dropout: a recompute would draw new masks) give the same numbers."""
    b = batch(4)
    runs = {}
    with mlx_cpu_kernels.disabled():
        for compile, ck, p in ((False, False, 0.3), (True, False, 0.3), (False, False, 0.0), (True, True, 0.0)):
            model = model_for(tiny_hf_llama, 4, LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear",
                                                            dropout=p))
            if ck:
                grad_checkpoint(model)
            grad_fn, _ = _device_step(model, compile)
            runs[compile, ck, p] = [grad_fn(b, (7, 1, 0)), grad_fn(b, (7, 2, 0))]
    for ref, key in (((False, False, 0.3), (True, False, 0.3)), ((False, False, 0.0), (True, True, 0.0))):
        (l0, g0), other = runs[ref]
        g0 = dict(tree_flatten(g0))
        loss, g = runs[key][0]
        assert loss == pytest.approx(l0, rel=tol(1e-5)), key
        for k, v in tree_flatten(g):
            assert rel_err(v, g0[k]) < tol(1e-4), (key, k)
    assert runs[True, False, 0.3][1][0] != pytest.approx(runs[True, False, 0.3][0][0], rel=1e-4)


def test_make_step_fns_takes_the_device_path_when_cpu_kernels_are_off(tiny_hf_llama):
    model = model_for(tiny_hf_llama, 4)
    b = batch(5)
    ref_loss, _ = reference(model, b)
    said = []
    with mlx_cpu_kernels.disabled():
        fns = make_step_fns(model, use_cpu_engine=False, say=said.append, batch_shape=(4, 64))
        assert not fns.packed and fns.grad.__qualname__.startswith("make_device_step")
        assert abs(fns.grad(b, (0, 0, 0))[0] - ref_loss) / ref_loss < tol(1e-5)
    assert not any("checkpointing" in s for s in said)   # 4 x 64 tokens fit in any memory limit


def test_checkpointing_is_chosen_when_the_step_would_not_fit(tiny_hf_llama):
    model = model_for(tiny_hf_llama, 4)
    head = output_head(model)
    vocab = head.weight.shape[0]
    small = memory_plan.activation_bytes(model, 4, 512, checkpointed=False)
    assert memory_plan.activation_bytes(model, 4, 512, checkpointed=True) < 0.6 * small    # 2 layers: one kept
    assert memory_plan.activation_bytes(model, 8, 512, False) > 1.9 * small     # grows with the batch
    assert not memory_plan.needs_checkpointing(model, vocab, 4, 512, limit=10 * 2 ** 30)
    assert memory_plan.needs_checkpointing(model, vocab, 4, 512, limit=small)
    said = []
    assert memory_plan.choose_checkpointing(model, head, True, None, said.append)     # asked for
    assert not memory_plan.choose_checkpointing(model, head, False, (1, 32), said.append) and not said


def test_attention_scores_are_counted_unless_cuda_fuses_the_backward(tiny_hf_llama, monkeypatch):
    """One float32 (heads, T, T) array per layer, except on CUDA when the padded length is a multiple
    of 128 (500 tokens pad to 512: fused; 480: not)."""
    model = model_for(tiny_hf_llama, 4)
    heads, layers = model.args.num_attention_heads, len(model.layers)
    ab = memory_plan.activation_bytes
    for cuda in (False, True):
        monkeypatch.setattr(mlx_step.dequant_gemm, "on_cuda", lambda cuda=cuda: cuda)
        with_scores = {seq: ab(model, 2, seq, False) for seq in (480, 500)}
        monkeypatch.setattr(memory_plan, "CUDNN_ATTENTION_MULTIPLE", 7)     # never a multiple: scores
        always = {seq: ab(model, 2, seq, False) for seq in (480, 500)}
        monkeypatch.setattr(memory_plan, "CUDNN_ATTENTION_MULTIPLE", 128)
        assert with_scores[480] == always[480]
        assert always[500] - with_scores[500] == (layers * 4 * 2 * heads * 512 * 512 if cuda else 0)


def test_lora_runs_in_bf16_on_a_bf16_base(tiny_hf_llama):
    """A half-precision base: LoRA matmuls in its dtype, fp32 factors, output close to fp32 math."""
    model = model_for(tiny_hf_llama, None)
    lin = next(m for _, m in model.named_modules() if isinstance(m, LoRALinear))
    lin.linear.weight = lin.linear.weight.astype(mx.bfloat16)
    x = mx.random.normal((3, 7, lin.lora_a.shape[0])).astype(mx.bfloat16)
    y = lin(x)
    assert y.dtype == mx.bfloat16 and lin.lora_a.dtype == mx.float32
    x32 = x.astype(mx.float32)
    want = x32 @ lin.linear.weight.astype(mx.float32).T + (x32 @ lin.lora_a) @ (lin.scale * lin.lora_b)
    assert rel_err(y.astype(mx.float32), want) < tol(1e-4, mx.bfloat16)
    ga = mx.grad(lambda a: (x @ a.astype(x.dtype) @ lin.lora_b.astype(x.dtype)).astype(mx.float32).sum())(lin.lora_a)
    assert ga.dtype == mx.float32 and np.isfinite(np.array(ga)).all()


def test_tolerances_are_the_stated_ones_on_cpu():
    from tolerance import BF16, GPU_FP32, on_gpu, tol_abs, transient_s

    if on_gpu():
        assert tol(1e-4) == GPU_FP32 and tol_abs(1e-4, [10.0]) == pytest.approx(10 * GPU_FP32)
    else:   # CI: every float32 bound exactly as the test states it
        assert tol(1e-4) == 1e-4 and tol(1e-6) == 1e-6 and tol_abs(1e-4, [100.0]) == 1e-4 and transient_s(30) == 30
    assert tol(1e-4, mx.bfloat16) == BF16 and tol(0.5, mx.bfloat16) == 0.5


@pytest.mark.parametrize("device_path", [True, False])
def test_checkpointed_blocks_recompute_the_forward_dropout_masks(tiny_hf_llama, monkeypatch, device_path):
    """With LoRA dropout on, a block recomputed in backward must draw the masks its forward drew:
    the gradient equals the one of the same step with nothing recomputed (mx.checkpoint a no-op),
    on the GPU path and on the MLX CPU-kernel path."""
    from contextlib import nullcontext

    lora = LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear", dropout=0.3)
    b = batch(6, lengths=(33, 33, 33))     # 32 columns: no padding, the same mask shapes on both paths

    def run(device):
        model = model_for(tiny_hf_llama, 4, lora)
        grad_checkpoint(model)
        with mlx_cpu_kernels.disabled() if device else nullcontext():
            loss, g = make_step_fns(model, use_cpu_engine=False, say=lambda s: None).grad(b, (1, 2, 0))
        return loss, dict(tree_flatten(g))

    with monkeypatch.context() as m:
        m.setattr(mx, "checkpoint", lambda f: f)
        ref_loss, ref = run(True)
    loss, g = run(device_path)
    assert loss == pytest.approx(ref_loss, rel=tol(1e-5))
    for k in ref:
        assert rel_err(g[k], ref[k]) < tol(1e-4), k


def test_train_end_to_end_on_the_gpu_path(tiny_q4, data_dir, tmp_path, monkeypatch):
    """train() with the CPU kernels off runs the GPU path: the whole step as one compiled graph
    (a) = the compiled loss-and-gradient step with the plain AdamW update apart (b), and the CPU
    engine's losses (c)."""
    from functools import partial

    from mlx_qlora.train import loop as loop_mod
    from mlx_qlora.train.loop import train

    run = partial(cfg, tiny_q4, data_dir, steps=3, eval_every=0, checkpoint_every=0)
    said, built = [], []
    monkeypatch.setattr("mlx_qlora.train.report.Reporter.print", lambda self, msg, *a, **k: said.append(str(msg)))
    real = mlx_step.make_train_step
    monkeypatch.setattr(mlx_step, "make_train_step", lambda *a, **k: built.append(1) or real(*a, **k))
    with mlx_cpu_kernels.disabled():
        a = train(run(tmp_path / "a", cpu_engine=False))
        assert any("padding waste" in s for s in said) and built == [1]    # not the CPU engine; one graph
        with monkeypatch.context() as m:
            real_fns = loop_mod.make_step_fns
            m.setattr(loop_mod, "make_step_fns", lambda *a, **k: real_fns(*a, **k)._replace(whole_step=None))
            m.setattr(mlx_step, "make_update", lambda model, opt: partial(opt.update, model))
            b = train(run(tmp_path / "b", cpu_engine=False))
    c = train(run(tmp_path / "c", cpu_gemm="fp32"))             # the CPU engine, fp32 products
    wa, wb, wc = (weights(tmp_path / x / "adapters.safetensors") for x in "abc")
    assert max(np.abs(wa[k]).max() for k in wa) > 0
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) < tol(1e-6)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol(1e-6))
    for key in ("train_loss", "val_loss"):
        assert a[key] == pytest.approx(c[key], rel=tol(1e-4)), key


def test_whole_step_keeps_nothing_of_a_nan_step(tiny_hf_llama, monkeypatch):
    """make_train_step: a step whose loss is NaN leaves adapter and optimizer state bit for bit
    as they were (the update is masked in the graph), the next finite step updates them; its
    clipped update equals grad_fn + scale_clip + AdamW done apart."""
    import mlx.optimizers as optim

    b = batch(6)
    runs = []
    for whole in (True, False):
        model = model_for(tiny_hf_llama, 4)
        opt = optim.AdamW(learning_rate=1e-2)
        with mlx_cpu_kernels.disabled():
            if whole:
                step = mlx_step.make_train_step(model, output_head(model), opt, max_norm=0.5)
                before = [np.array(v) for _, v in tree_flatten(model.trainable_parameters())]
                with monkeypatch.context() as m:
                    real_pad = mlx_step.pad_batch
                    m.setattr(mlx_step, "pad_batch", lambda b: (lambda i, t, w: (i, t, w * float("nan")))(*real_pad(b)))
                    loss, norm = step(b, (0, 0, 0))
                assert np.isnan(loss)
                after = [np.array(v) for _, v in tree_flatten(model.trainable_parameters())]
                assert all(np.array_equal(x, y) for x, y in zip(before, after))
                assert opt.state["step"].item() == 0
                loss, norm = step(b, (0, 0, 0))
                assert opt.state["step"].item() == 1 and norm > 0.5       # clipped
            else:
                grad_fn, _ = mlx_step.make_device_step(model, output_head(model))
                loss, g = grad_fn(b, (0, 0, 0))
                g, norm = mlx_step.make_scale_clip(0.5, compiled=True)(g, b.n_loss)
                opt.update(model, g)
                norm = norm.item()
        runs.append((loss, norm, dict(tree_flatten(model.trainable_parameters()))))
    (l0, n0, p0), (l1, n1, p1) = runs
    assert l0 == pytest.approx(l1, rel=tol(1e-6)) and n0 == pytest.approx(n1, rel=tol(1e-5))
    assert max(rel_err(p0[k], p1[k]) for k in p0) < tol(1e-5)


def test_long_rows_pad_to_the_cudnn_attention_multiple_on_cuda(tiny_hf_llama, monkeypatch):
    """32 everywhere; on CUDA rows of LONG_ROW+ tokens go to a multiple of 128 (MLX's fused cuDNN
    attention backward needs it); the padding carries weight 0, and a step padded to 128 gives
    the reference loss and gradients."""
    from types import SimpleNamespace

    assert mlx_step.pad_multiple(1030, cuda=False) == 32 and mlx_step.pad_multiple(1030, cuda=True) == 128
    assert mlx_step.pad_multiple(1000, cuda=True) == 32
    t = 1030
    b = SimpleNamespace(inputs=np.ones((2, t), np.int32), targets=np.ones((2, t), np.int32),
                        loss_index=np.arange(2 * t)[::3])
    for multiple, width in ((32, 1056), (128, 1152)):
        i, tg, w = mlx_step.pad_batch(b, multiple)
        assert i.shape == tg.shape == w.shape == (2, width)
        assert float(w.sum()) == len(b.loss_index) and float(w[:, t:].sum()) == 0
    assert mlx_step.pad_batch(b)[0].shape[1] == (1152 if mlx_step.dequant_gemm.on_cuda() else 1056)
    monkeypatch.setattr(mlx_step, "PAD_MULTIPLE", 128)
    check_device_step(model_for(tiny_hf_llama, 4))


def test_swiglu_keeps_less_for_backward_and_the_same_gradients():
    """mlx_cpu_kernels.lean_swiglu (backward recomputes sigmoid from gate) == silu(gate) * up in
    value and gradients, and through 8 MLP blocks of 512 rows x 1,024 intermediate the plain expression's
    backward keeps more: eager ~2 (rows x intermediate) arrays per block more (measured 34 MiB of
    2 MiB arrays), compiled ~1 (14 MiB). Bounds: 1.5 and 0.5 such arrays per block."""
    d, inter, rows, n = 64, 1024, 512, 8
    mx.random.seed(0)
    ws = [tuple(mx.random.normal(s) / s[0] ** 0.5 for s in ((d, inter), (d, inter), (inter, d))) for _ in range(n)]
    x0 = mx.random.normal((rows, d))
    mx.eval(x0, ws)
    plain = lambda g, u: nn.silu(g) * u          # noqa: E731

    def run(sw, compiled):
        def f(x):
            for g, u, dn in ws:
                x = x + sw(x @ g, x @ u) @ dn
            return mx.sum(x)

        gf = mx.compile(mx.grad(f)) if compiled else mx.grad(f)
        mx.eval(gf(x0))
        mx.reset_peak_memory()
        out = gf(x0)
        mx.eval(out)
        return mx.get_peak_memory(), out

    one = rows * inter * 4
    for compiled, fewer in ((False, 1.5), (True, 0.5)):
        (p0, g0), (p1, g1) = run(plain, compiled), run(mlx_cpu_kernels.lean_swiglu, compiled)
        assert rel_err(g1, g0) < tol(1e-5), compiled
        assert p1 <= p0 - fewer * n * one, (compiled, p0 / 2 ** 20, p1 / 2 ** 20)
    g, u = mx.random.normal((7, 5)), mx.random.normal((7, 5))
    assert rel_err(mlx_cpu_kernels.lean_swiglu(g, u), plain(g, u)) < tol(1e-6)


def test_the_gpu_step_routes_every_swiglu_mlp_once(tiny_hf_llama, monkeypatch):
    """make_device_step swaps each SwiGLU MLP's class (once, also when called again) so its forward
    goes through mlx_cpu_kernels.swiglu, which off the CPU kernels is lean_swiglu."""
    model = model_for(tiny_hf_llama, 4)
    calls = []
    real = mlx_cpu_kernels.lean_swiglu
    monkeypatch.setattr(mlx_cpu_kernels, "lean_swiglu", lambda g, u: calls.append(1) or real(g, u))
    with mlx_cpu_kernels.disabled():
        for _ in range(2):
            mlx_step.make_device_step(model, output_head(model), compile=False)
        mlps = [layer.mlp for layer in model.layers]
        assert all(type(m).__name__ == "FastMLP" and type(m).__mro__[1].__name__ == "MLP" for m in mlps)
        model(mx.array([[1, 2, 3]]))
    assert len(calls) == len(mlps)

