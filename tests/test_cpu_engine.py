"""The NumPy/BLAS CPU engine against MLX autodiff on the plain mlx-lm model (no fast path)."""
from __future__ import annotations

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from mlx_qlora.train.engines import mlx_cpu_kernels, numpy_engine
from mlx_qlora.train.engines.numpy_engine import CpuEngine
from mlx_qlora.train.data import Example, collate
from mlx_qlora.train.lora import LoRALinear, apply_lora
from mlx_qlora.train.loop import make_loss
from mlx_qlora.train.config import LoraConfig
from tolerance import tol


def rel_err(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def model_for(path, bits=4, lora=None, seed=0):
    model, _ = load_model(path)
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    mx.random.seed(seed)
    apply_lora(model, lora or LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear"))
    for _, m in model.named_modules():     # a trained-looking adapter: lora_b != 0
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())
    return model


def batch(seed=0, lengths=(9, 5, 12), vocab=200, prompt=3):
    """Rows of different lengths (so packing matters); loss only after a 3-token prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        mask = np.arange(n) >= prompt
        rows.append(Example(rng.integers(1, vocab, n).astype(np.int32), mask))
    return collate(rows)


def reference(model, b):
    """Loss sum and gradients from MLX autodiff over the plain model (quantized_matmul, MLX sdpa)."""
    with mlx_cpu_kernels.disabled():
        loss_fn = make_loss(model)
        vg = nn.value_and_grad(model, loss_fn)
        loss, g = vg(model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.loss_index))
        mx.eval(loss, g)
    return loss.item(), dict(tree_flatten(g))


@pytest.mark.parametrize("arch,bits,layers,targets", [
    ("llama", 4, "all", "all-linear"),
    ("llama", None, "last 1", ["q_proj", "v_proj", "down_proj"]),
    ("llama", 8, [0], ["k_proj", "o_proj", "up_proj"]),       # frozen block above the adapted one
    ("qwen2", 4, "all", "all-linear"),                          # q/k/v biases, untied head
    ("qwen3", 4, "all", "all-linear"),                          # per-head q/k RMSNorm, head_dim 32
    ("qwen3", None, "last 1", ["q_proj", "k_proj"]),            # gradients through the q/k norms
    ("phi3", 4, "all", "all-linear"),                           # fused qkv / gate_up, partial rotary
    ("phi3", 8, [1], ["qkv_proj", "down_proj"]),
    ("llama3", 4, "all", "all-linear"),                         # Llama 3 scaled rope (explicit periods)
    ("phi4mini", 4, "all", "all-linear"),                       # LongRoPE: periods and a feature scale
    ("smollm3", 4, "all", "all-linear"),                        # layer 3 without rope (NoPE)
    ("olmo2", 4, "all", "all-linear"),                          # post-norms, whole-width q/k norms
    ("olmo2", None, [0], ["q_proj", "o_proj", "up_proj"]),      # frozen block above the adapted one
    ("granite", 4, "all", "all-linear"),                        # the four multipliers
])
@pytest.mark.cpu_math
def test_loss_and_grads_match_mlx_autodiff(request, arch, bits, layers, targets):
    path = request.getfixturevalue(f"tiny_hf_{arch}" if arch in ("llama", "qwen2") else f"tiny_f32_{arch}")
    model = model_for(path, bits, LoraConfig(rank=4, alpha=8, layers=layers, targets=targets))
    want_rope = {"llama3": "Llama3RoPE", "phi4mini": "SuScaledRoPE", "smollm3": "NoPE"}.get(arch)
    if want_rope:   # the rope variant under test really is in the model
        assert want_rope in {type(layer.self_attn.rope).__name__ for layer in model.layers}
    b = batch()
    ref_loss, ref = reference(model, b)
    loss, grads = CpuEngine(model).loss_and_grad(b)
    grads = dict(tree_flatten(grads))
    assert abs(loss - ref_loss) / abs(ref_loss) < tol(1e-5)
    assert set(grads) == set(ref) and len(ref) > 0
    for k in ref:
        assert grads[k].shape == ref[k].shape
        assert rel_err(grads[k], ref[k]) < tol(1e-4), k
    assert abs(CpuEngine(model).loss(b) - ref_loss) / abs(ref_loss) < tol(1e-5)


def test_fresh_adapter_loss_equals_base_model(tiny_hf_llama):
    """B = 0: the engine's loss is the base model's (plain mlx-lm forward, no LoRA at all)."""
    base, _ = load_model(tiny_hf_llama)
    nn.quantize(base, group_size=32, bits=4)
    b = batch(1)
    with mlx_cpu_kernels.disabled():
        logits = base(mx.array(b.inputs)).reshape(-1, base.args.vocab_size)[mx.array(b.loss_index)]
        want = nn.losses.cross_entropy(logits, mx.array(b.targets.reshape(-1)[b.loss_index]), reduction="sum").item()
    mx.random.seed(0)
    apply_lora(base, LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear"))
    assert abs(CpuEngine(base).loss(b) - want) / want < tol(1e-5)


def test_checkpointing_and_weight_cache_change_nothing(tiny_hf_llama):
    """Recomputed blocks (same dropout masks) and cached fp32 weights give the same numbers."""
    model = model_for(tiny_hf_llama, 4, LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear", dropout=0.2))
    b = batch(2)
    runs = [CpuEngine(model, grad_checkpoint=ck, weight_cache_mb=mb).loss_and_grad(b, seed=(3, 1))
            for ck, mb in ((False, 0), (True, 0), (False, 64), (True, 64))]
    assert CpuEngine(model, weight_cache_mb=64).cached_mb > 0
    l0, g0 = runs[0][0], dict(tree_flatten(runs[0][1]))
    for loss, g in runs[1:]:
        assert loss == pytest.approx(l0, rel=1e-6)
        for k, v in tree_flatten(g):
            assert rel_err(v, g0[k]) < 1e-6, k
    # dropout is on: another seed draws other masks, and evaluation draws none
    other = CpuEngine(model).loss_and_grad(b, seed=(3, 2))[0]
    assert other != pytest.approx(l0, rel=1e-6)
    assert CpuEngine(model).loss(b) == pytest.approx(CpuEngine(model).loss(b), rel=0)


@pytest.mark.parametrize("traditional,dims", [(False, 16), (True, 16), (False, 8)])
def test_rope_matches_mlx_fast_rope(tiny_hf_llama, traditional, dims):
    model = model_for(tiny_hf_llama)
    blk = CpuEngine(model).blocks[0]
    blk.rope = numpy_engine.rope_spec(nn.RoPE(dims, traditional=traditional, base=1000.0, scale=0.5))
    heads, d, lengths = 3, blk.heads.d, [7, 4]
    geo = numpy_engine._Geometry(lengths)
    x = np.random.default_rng(0).normal(size=(sum(lengths), heads * d)).astype(np.float32)
    got = blk._rope(x, heads, geo, inverse=False)
    for (s, n) in geo.segments:
        seg = mx.array(x[s:s + n].reshape(n, heads, d).transpose(1, 0, 2))
        want = mx.fast.rope(seg, dims, traditional=traditional, base=1000.0, scale=0.5, offset=0)
        assert rel_err(got[s:s + n], np.array(want).transpose(1, 0, 2).reshape(n, -1)) < tol(1e-5)
    assert rel_err(blk._rope(got, heads, geo, inverse=True), x) < 1e-5     # the transpose undoes it


def test_unsupported_models_fall_back(tiny_hf_llama):
    model = model_for(tiny_hf_llama, lora=LoraConfig(rank=4, alpha=8, use_dora=True))
    assert numpy_engine.unsupported(model) == "DoRA"
    with pytest.raises(ValueError, match="DoRA"):
        CpuEngine(model)
    plain = model_for(tiny_hf_llama)
    assert numpy_engine.unsupported(plain) is None
    plain.model.norm.unfreeze()
    assert "other than LoRA" in numpy_engine.unsupported(plain)


def test_in_place_kernels_keep_the_bits():
    """SwiGLU, RMSNorm, their backward and RoPE write into preallocated outputs, in row blocks: the
    fp32 path's numbers must stay the bits of the plain expressions they replaced."""
    from mlx_qlora.train.engines import numpy_kernels as ops
    from mlx_qlora.train.engines.cpu_gemm import to_bf16

    rng = np.random.default_rng(0)
    gu = (rng.standard_normal((301, 2 * 96)) * 4).astype(np.float32)
    g, u = np.split(gu, 2, axis=1)                 # strided halves, as a fused gate_up gives them
    dact = rng.standard_normal(g.shape).astype(np.float32)
    s = 1.0 / (np.exp(-g) + 1.0)
    act, sig = ops.swiglu(g, u, keep_sigmoid=True)
    assert np.array_equal(sig, s) and np.array_equal(act, s * g * u)
    act16 = np.empty(g.shape, np.uint16)
    assert np.array_equal(ops.swiglu(g, u, False, act16, lambda a, o: np.copyto(o, to_bf16(a)))[0], act)
    assert np.array_equal(act16, to_bf16(act))
    fg = (1.0 - s) * g + 1.0
    want = ((fg * s) * u * dact, (g * s) * dact)
    for kept in (sig, None):
        d16 = (np.empty(g.shape, np.uint16), np.empty(g.shape, np.uint16))
        dg, du = ops.swiglu_back(dact, g, u, kept, d16, lambda a, o: np.copyto(o, to_bf16(a)))
        assert np.array_equal(dg, want[0]) and np.array_equal(du, want[1])
        assert np.array_equal(d16[0], to_bf16(dg)) and np.array_equal(d16[1], to_bf16(du))
    h = (rng.standard_normal((301, 576)) * 3).astype(np.float32)      # big enough to split over threads
    w, dy = rng.standard_normal(576).astype(np.float32), rng.standard_normal((301, 576)).astype(np.float32)
    r = 1.0 / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + 1e-5)
    y16 = np.empty(h.shape, np.uint16)
    got = ops.rms(h, w, 1e-5, y16, lambda a, o: np.copyto(o, to_bf16(a)))
    assert all(np.array_equal(a, b) for a, b in zip(got, ((h * r) * w, h * r, r))) and np.array_equal(y16, to_bf16(got[0]))
    g = dy * w
    assert np.array_equal(ops.rms_back(dy, w, h * r, r), r * (g - (h * r) * np.mean(g * (h * r), axis=-1, keepdims=True)))
    x = rng.standard_normal((13, 3 * 16)).astype(np.float32)
    cos, sin = (rng.standard_normal((13, 1, 8)).astype(np.float32) for _ in range(2))
    for dims, trad, inv in ((8, False, False), (8, True, True), (16, False, False)):
        c, sn = cos[..., :dims // 2], (-sin if inv else sin)[..., :dims // 2]
        x3, want = x.reshape(13, 3, 16), x.reshape(13, 3, 16).copy()
        i1, i2 = (slice(0, dims, 2), slice(1, dims, 2)) if trad else (slice(0, dims // 2), slice(dims // 2, dims))
        want[..., i1] = x3[..., i1] * c - x3[..., i2] * sn
        want[..., i2] = x3[..., i2] * c + x3[..., i1] * sn
        assert np.array_equal(ops.rope(x, 3, cos[..., :dims // 2], sin[..., :dims // 2], dims, trad, inv),
                              want.reshape(13, -1))
