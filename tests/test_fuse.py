"""fuse: merged output equals base + adapter, merging twice changes nothing, errors are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lora_fixtures import ALL, converted, mlx_logits, mlx_model, write_adapter
from tolerance import tol_abs

TOKENS = [5, 80, 17, 200, 33, 140, 7, 99, 251, 64, 12, 3]


@pytest.fixture(scope="module")
def q4(tmp_path_factory, tiny_hf_llama):
    return converted(tmp_path_factory, tiny_hf_llama, "tiny_llama_q4", q_group_size=32)


@pytest.fixture(scope="module")
def f32(tmp_path_factory, tiny_hf_llama):
    return converted(tmp_path_factory, tiny_hf_llama, "tiny_llama_f32", quantize=False, dtype="float32")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, q4):
    return write_adapter(tmp_path_factory.mktemp("ad") / "adapter", q4, targets=ALL, layers=[0, 1])


def _fuse(model, adapter, out, **kw):
    from mlx_qlora.export.fuse import FuseConfig, run_fuse

    return run_fuse(FuseConfig(model=str(model), adapter=str(adapter), out_dir=str(out), **kw))


def _weights(d):
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(d / "model.safetensors")).items()}


def test_fused_float_equals_base_plus_adapter(f32, adapter, tmp_path):
    ref = mlx_logits(mlx_model(f32, adapter)[0], TOKENS)
    base = mlx_logits(mlx_model(f32)[0], TOKENS)
    fused = mlx_logits(mlx_model(_fuse(f32, adapter, tmp_path / "fused"))[0], TOKENS)
    assert np.abs(fused - ref).max() < tol_abs(1e-4, ref)
    assert np.abs(ref - base).mean() > 0.05  # the adapter really changes the model


def test_fused_quantized_close_to_base_plus_adapter(q4, adapter, tmp_path):
    ref = mlx_logits(mlx_model(q4, adapter)[0], TOKENS)
    base = mlx_logits(mlx_model(q4)[0], TOKENS)
    out = _fuse(q4, adapter, tmp_path / "fused")
    fused = mlx_logits(mlx_model(out)[0], TOKENS)
    err, effect = np.abs(fused - ref).mean(), np.abs(ref - base).mean()
    # random 64-wide weights lose a lot to 4 bits (the base itself is 1.4 off its float original)
    assert err < 0.5 * effect, (err, effect)
    w, cfg = _weights(out), json.loads((out / "config.json").read_text())
    # weight level: the re-quantization error is 4-bit rounding of the exact merge, no more
    import mlx.core as mx

    from mlx_qlora.train.adapter_files import read_adapter

    ad, b = read_adapter(adapter), _weights(q4)
    for m, (a, bb) in ad.pairs.items():
        exact = np.array(mx.dequantize(*(mx.array(b[f"{m}.{s}"]) for s in ("weight", "scales", "biases")),
                                       group_size=32, bits=4) + ad.scale * (a @ bb).T)
        got = np.array(mx.dequantize(*(mx.array(w[f"{m}.{s}"]) for s in ("weight", "scales", "biases")),
                                     group_size=32, bits=4))
        plain = np.array(mx.dequantize(*mx.quantize(mx.array(exact), group_size=32, bits=4), group_size=32, bits=4))
        rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert rel <= 1.02 * np.linalg.norm(plain - exact) / np.linalg.norm(exact) and rel < 0.12, (m, rel)
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    s = w["model.layers.0.self_attn.q_proj.scales"]
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)  # fp16 grid: exports to Q4_1 exactly
    # --dequantize: float weights, equal to the quantized base + adapter up to float32 rounding
    deq = _fuse(q4, adapter, tmp_path / "deq", dequantize=True)
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    assert np.abs(mlx_logits(mlx_model(deq)[0], TOKENS) - ref).max() < tol_abs(1e-4, ref)


def test_merging_twice_changes_nothing(q4, adapter, tmp_path):
    once = _fuse(q4, adapter, tmp_path / "once")
    again = _fuse(q4, adapter, tmp_path / "again")
    twice = _fuse(once, adapter, tmp_path / "twice")
    base, w1, w2, w3 = _weights(q4), _weights(once), _weights(again), _weights(twice)
    assert w1.keys() == w2.keys() == w3.keys() == base.keys()
    for k in w1:
        assert np.array_equal(w1[k], w2[k]) and np.array_equal(w1[k], w3[k]), k
    untouched = [k for k in base if "mlp" not in k and "self_attn" not in k]
    assert untouched and all(np.array_equal(base[k], w1[k]) for k in untouched)
    assert not np.array_equal(base["model.layers.0.self_attn.q_proj.weight"], w1["model.layers.0.self_attn.q_proj.weight"])
    assert (tmp_path / "once" / "tokenizer.json").exists()


def test_errors_are_one_line(q4, adapter, tmp_path):
    from mlx_qlora.errors import UserError

    with pytest.raises(UserError, match="nope not found"):
        _fuse(q4, tmp_path / "nope", tmp_path / "x")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        _fuse(q4, dora, tmp_path / "x")
    other = write_adapter(tmp_path / "wide", q4, rank=4)
    import mlx.core as mx

    t = mx.load(str(other / "adapters.safetensors"))
    t["model.layers.0.self_attn.q_proj.lora_a"] = mx.zeros((32, 4))  # shaped for another model
    mx.save_safetensors(str(other / "adapters.safetensors"), t)
    with pytest.raises(UserError, match="another base model"):
        _fuse(q4, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="already exists"):
        _fuse(q4, adapter, q4.parent)
