"""LoRA layers, the CPU fast path and the adapter format, checked against plain MLX / mlx-lm."""
from __future__ import annotations

import json

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear as MlxDoRALinear
from mlx_lm.tuner.lora import LoRALinear as MlxLoRALinear
from mlx_lm.utils import load_model

from mlx_qlora.train.engines import mlx_cpu_kernels
from mlx_qlora.errors import UserError
from mlx_qlora.train.lora import (LoRALinear, apply_lora, count_parameters, load_adapter, read_adapter_config,
                            save_adapter)
from mlx_qlora.train.config import LoraConfig
from tolerance import tol


def rel_err(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def load(path, bits=None, group_size=32):
    model, _ = load_model(path)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


TOKENS = mx.array([[5, 70, 80, 90, 100, 33, 2, 17], [9, 8, 7, 6, 5, 4, 3, 2]])


def perturb(model, seed=0):
    """Give every lora_b a non-zero value so the adapter actually changes the output."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
            if m.is_dora:
                m.m = m.m * (1 + 0.1 * mx.random.normal(m.m.shape))


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_fresh_adapter_gives_base_logits_exactly(tiny_hf_llama, bits):
    model = load(tiny_hf_llama, bits)
    mlx_cpu_kernels.accelerate(model)  # base and adapted model run the same base kernels
    base = model(TOKENS)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.1))
    model.eval()
    assert np.array_equal(np.array(model(TOKENS)), np.array(base))


def test_fresh_adapter_exact_on_plain_path(tiny_hf_qwen2):
    model = load(tiny_hf_qwen2, 4)
    with mlx_cpu_kernels.disabled():
        base = model(TOKENS)
        apply_lora(model, LoraConfig(rank=8, use_dora=True))
        assert np.array_equal(np.array(model(TOKENS)), np.array(base))


@pytest.mark.parametrize("bits,group_size,bias", [(4, 32, False), (4, 64, True), (8, 32, False)])
@pytest.mark.parametrize("dora", [False, True])
def test_fast_path_matches_mlx_lm_layer(bits, group_size, bias, dora):
    """Outputs and gradients (lora_a, lora_b, m, x) vs mlx-lm's LoRA/DoRA on QuantizedLinear."""
    mx.random.seed(3)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=bias), group_size=group_size, bits=bits)
    ref_cls = MlxDoRALinear if dora else MlxLoRALinear
    ref = ref_cls.from_base(q, r=8, scale=2.5)
    ref.lora_b = 0.1 * mx.random.normal(ref.lora_b.shape)
    ours = LoRALinear(q, rank=8, scale=2.5, dora=dora)
    ours.lora_a, ours.lora_b = ref.lora_a, ref.lora_b
    if dora:
        assert rel_err(ours.m, ref.m) < 1e-6
        ours.m = ref.m
    x = mx.random.normal((3, 7, 128))

    def run(layer):
        def loss(params, x):
            layer.update(params)
            return (layer(x) * mx.cos(mx.arange(96))).sum()
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b"] + (["m"] if dora else []), recurse=False)
        (val, (gp, gx)) = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        return layer(x), dict(tree_flatten(gp)), gx

    with mlx_cpu_kernels.disabled():
        y_ref, gp_ref, gx_ref = run(ref)
    y, gp, gx = run(ours)
    assert rel_err(y, y_ref) < tol(1e-4)
    assert rel_err(gx, gx_ref) < tol(1e-4)
    assert set(gp) == set(gp_ref) and len(gp) == (3 if dora else 2)
    for k in gp_ref:
        assert rel_err(gp[k], gp_ref[k]) < tol(1e-4), k


def loss_and_grads(model, fused: bool):
    targets = mx.roll(TOKENS, -1, axis=1)
    mask = mx.ones(TOKENS.shape).at[:, -1].multiply(0)

    def loss(model):
        if fused:
            h = model.model(TOKENS)
            idx = mx.array(np.flatnonzero(np.array(mask).reshape(-1)))
            h = h.reshape(-1, h.shape[-1])[idx]
            return mlx_cpu_kernels.fused_cross_entropy(h, model.model.embed_tokens, targets.reshape(-1)[idx])
        ce = nn.losses.cross_entropy(model(TOKENS), targets, reduction="none")
        return (ce * mask).sum()

    return nn.value_and_grad(model, loss)(model)


def test_full_model_fast_path_matches_plain(tiny_hf_llama):
    """Whole 4-bit model: loss and every LoRA gradient, fused CE + fast linears vs plain MLX."""
    results = []
    for fast in (False, True):
        model = load(tiny_hf_llama, 4)
        mx.random.seed(0)
        apply_lora(model, LoraConfig(rank=4, alpha=8, layers="last 1", targets=["q_proj", "down_proj"]))
        perturb(model)
        if fast:
            mlx_cpu_kernels.accelerate(model)
            results.append(loss_and_grads(model, fused=True))
        else:
            with mlx_cpu_kernels.disabled():
                results.append(loss_and_grads(model, fused=False))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < tol(1e-5)
    g0, g1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert set(g0) == set(g1) and len(g0) == 4
    for k in g0:
        assert rel_err(g1[k], g0[k]) < tol(1e-4), k
        assert float(mx.abs(g0[k]).max()) > 0, k


def test_trainable_parameter_counts(tiny_hf_llama):
    # tiny llama: hidden 64, 4 heads of 16, 2 kv heads (kv dim 32), intermediate 128, 2 layers.
    # rank 8: q 8*(64+64) + k 8*(64+32) + v 8*(64+32) + o 8*(64+64) + 3 mlp 8*(64+128) = 8192.
    model = load(tiny_hf_llama, 4)
    apply_lora(model, LoraConfig(rank=8))
    trainable, total = count_parameters(model)
    assert trainable == 2 * 8192
    base_total = sum(v.size for _, v in tree_flatten(load(tiny_hf_llama).parameters()))
    assert total == base_total + trainable
    model = load(tiny_hf_llama)
    apply_lora(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers="last 1"))
    assert count_parameters(model)[0] == 4 * (64 + 64) + 4 * (64 + 32)
    model = load(tiny_hf_llama)
    apply_lora(model, LoraConfig(rank=2, targets=["o_proj"], layers=[0], use_dora=True))
    assert count_parameters(model)[0] == 2 * (64 + 64) + 64   # DoRA adds m (out,)


def test_rslora_scale():
    assert LoraConfig(rank=16, alpha=32).scale == 2.0
    assert LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


@pytest.mark.cpu_math
def test_save_load_roundtrip_and_mlx_lm_compat(tiny_hf_llama, tmp_path):
    model = load(tiny_hf_llama)
    cfg = LoraConfig(rank=4, alpha=12, targets=["q_proj", "v_proj", "mlp.down_proj"], layers="last 1")
    apply_lora(model, cfg)
    perturb(model)
    expected = np.array(model(TOKENS))
    save_adapter(model, tmp_path / "ad", cfg, base_model=str(tiny_hf_llama))
    conf = read_adapter_config(tmp_path / "ad")
    assert conf["rank"] == 4 and conf["alpha"] == 12 and conf["scale"] == 3.0 and conf["layers"] == [1]
    assert conf["target_modules"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert conf["base_model"] == str(tiny_hf_llama) and conf["format_version"] == 1
    names = set(mx.load(str(tmp_path / "ad" / "adapters.safetensors")))
    assert "model.layers.1.self_attn.q_proj.lora_a" in names and len(names) == 6
    fresh = load_adapter(load(tiny_hf_llama), tmp_path / "ad")
    assert np.array_equal(np.array(fresh(TOKENS)), expected)
    from mlx_lm import load as mlx_lm_load  # mlx-lm reads the same directory
    m2, _ = mlx_lm_load(str(tiny_hf_llama), adapter_path=str(tmp_path / "ad"))
    assert rel_err(m2(TOKENS), expected) < 1e-6


def test_adapter_errors(tiny_hf_llama, tmp_path):
    with pytest.raises(UserError, match="not an adapter directory"):
        read_adapter_config(tmp_path)
    with pytest.raises(UserError, match="no linear named 'qkv'"):
        apply_lora(load(tiny_hf_llama), LoraConfig(targets=["qkv"]))
    with pytest.raises(UserError, match="only 2 layers"):
        apply_lora(load(tiny_hf_llama), LoraConfig(layers="last 5"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"rank": 4, "alpha": 8, "target_modules": ["q_proj"],
                                                              "layers": [0], "scale": 2.0}))
    with pytest.raises(UserError, match="adapters.safetensors is missing"):
        load_adapter(load(tiny_hf_llama), tmp_path)


def test_fused_cross_entropy_matches_plain():
    mx.random.seed(1)
    h = mx.random.normal((600, 32))           # > CE_CHUNK_ROWS: several chunks
    head = nn.QuantizedLinear.from_linear(nn.Linear(32, 300), group_size=32, bits=4)
    t = mx.random.randint(0, 300, (600,))

    def f_fused(h):
        return mlx_cpu_kernels.fused_cross_entropy(h, head, t)

    def f_plain(h):
        return mlx_cpu_kernels.plain_cross_entropy(h @ mlx_cpu_kernels.dense_weight(head).T, t)

    (l0, g0), (l1, g1) = mx.value_and_grad(f_plain)(h), mx.value_and_grad(f_fused)(h)
    assert rel_err(l1, l0) < tol(1e-5) and rel_err(g1, g0) < tol(1e-4)
    assert rel_err(mlx_cpu_kernels.fused_cross_entropy(h, head, t, with_grad=False), l0) < tol(1e-5)


def test_numpy_swiglu_matches_mlx():
    mx.random.seed(2)
    g, u = 4 * mx.random.normal((3, 5, 40)), mx.random.normal((3, 5, 40))
    w = mx.cos(mx.arange(40))

    def fast(g, u):
        return (mlx_cpu_kernels.swiglu(g, u) * w).sum()

    def plain(g, u):
        return (nn.silu(g) * u * w).sum()

    (l0, (g0, u0)), (l1, (g1, u1)) = (mx.value_and_grad(f, argnums=(0, 1))(g, u) for f in (plain, fast))
    assert rel_err(l1, l0) < tol(1e-5) and rel_err(g1, g0) < tol(1e-5) and rel_err(u1, u0) < tol(1e-5)


def test_accelerate_swaps_classes_in_place(tiny_hf_llama):
    model = load(tiny_hf_llama, 4)
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    # 2 layers x 7 quantized linears + 2 SwiGLU MLPs (the tied embedding is not a linear)
    assert mlx_cpu_kernels.accelerate(model) == 2 * 7 + 2
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)


def test_cpu_attention_matches_mlx_sdpa():
    """mlx_cpu_kernels.attention (BLAS + NumPy softmax) vs mx.fast SDPA: output and all three gradients."""
    for B, H, Hk, L, D, mask in [(2, 9, 3, 17, 64, "causal"), (1, 4, 4, 5, 8, None), (2, 6, 2, 9, 16, "causal")]:
        mx.random.seed(L)
        q, k, v, c = (mx.random.normal(s) for s in [(B, H, L, D), (B, Hk, L, D), (B, Hk, L, D), (B, H, L, D)])

        def ref(q, k, v):
            return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask) * c).sum()

        def new(q, k, v):
            return (mlx_cpu_kernels.attention(q, k, v, None, 0.3, mask) * c).sum()

        assert rel_err(new(q, k, v), ref(q, k, v)) < tol(1e-5)
        for a, b in zip(mx.grad(new, argnums=(0, 1, 2))(q, k, v), mx.grad(ref, argnums=(0, 1, 2))(q, k, v)):
            assert rel_err(a, b) < tol(1e-4)
