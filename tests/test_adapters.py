"""Several adapters over one base: each gives exactly its own fused model's logits, switching
needs no reload, bad adapters fail with one-line errors. ``make_adapter`` is shared with the
chat/serve/generate tests (imported from here)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlx_qlora.infer.adapters import AdapterSet, parse_adapter_specs
from mlx_qlora.errors import UserError
from tolerance import tol, tol_abs

ALL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_untied_llama(path: Path) -> Path:
    """A tiny llama with its own lm_head: unlike the tied fixture, whose greedy output just
    repeats the last token, its continuations vary, so comparisons of outputs mean something."""
    import tiny

    return tiny.write_hf_dir(path, arch="llama", tie=False, seed=3)


def make_adapter(model_dir: Path, out: Path, seed: int, rank: int = 4, scale: float = 4.0,
                 modules: tuple[str, ...] = ALL, layers: tuple[int, ...] | None = None) -> Path:
    """Random LoRA in the training format, large enough to change greedy outputs."""
    from safetensors.numpy import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, nl = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h)}
    rng = np.random.default_rng(seed)
    layers = tuple(range(nl)) if layers is None else layers
    tensors = {}
    for i in layers:
        for m in modules:
            fin, fout = dims[m]
            tensors[f"model.layers.{i}.{m}.lora_a"] = rng.normal(0, 1 / np.sqrt(fin), (fin, rank)).astype(np.float32)
            tensors[f"model.layers.{i}.{m}.lora_b"] = rng.normal(0, 1 / np.sqrt(rank), (rank, fout)).astype(np.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapters.safetensors"))
    keys = list(modules)
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": len(layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys},
        "base_model": str(model_dir), "rank": rank, "alpha": scale * rank, "scale": scale,
        "use_rslora": False, "use_dora": False, "target_modules": keys, "layers": list(layers),
        "format_version": 1}))
    return out


def fused_model(model_dir: Path, adapter_dir: Path):
    """A second copy of the base with W += scale * (a @ b).T: the reference for one adapter."""
    from mlx.utils import tree_flatten

    from mlx_qlora.model.model_io import load

    model, _ = load(model_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = mx.load(str(adapter_dir / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    updates = []
    for k in t:
        if k.endswith(".lora_a"):
            m = k[:-len(".lora_a")]
            delta = cfg["scale"] * (t[k] @ t[m + ".lora_b"]).T
            updates.append((m + ".weight", params[m + ".weight"] + delta))
    model.load_weights(updates, strict=False)
    return model


@pytest.fixture(scope="module")
def two_adapters(tiny_hf_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"sql": make_adapter(tiny_hf_llama, d / "sql", seed=11),
            "poem": make_adapter(tiny_hf_llama, d / "poem", seed=22, rank=8, scale=2.0,
                                 modules=("self_attn.v_proj", "mlp.down_proj"), layers=(1,))}


def _logits(model, ids):
    return model(mx.array(ids)[None])[0]


@pytest.mark.cpu_math
def test_each_adapter_gives_its_fused_model_logits(tiny_hf_llama, two_adapters):
    from mlx_qlora.model.model_io import load

    model, _ = load(tiny_hf_llama)
    plain, _ = load(tiny_hf_llama)
    ids = [5, 70, 33, 101, 7, 12]
    aset = AdapterSet(model)
    for name, path in two_adapters.items():
        aset.add(name, path)
    assert sorted(aset.names) == ["poem", "sql"]
    refs = {name: _logits(fused_model(tiny_hf_llama, p), ids) for name, p in two_adapters.items()}
    base = _logits(plain, ids)
    # switch back and forth: each state reproduces its reference exactly, no leak between them
    for name in ["sql", None, "poem", "sql", "base", "poem"]:
        seconds = aset.activate(name)
        assert seconds < 1.0
        got = _logits(model, ids)
        want = base if name in (None, "base") else refs[name]
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=tol(1e-4), atol=tol_abs(1e-4, want))
    # and the adapters really change the model (else the test above proves nothing)
    assert not np.allclose(np.array(refs["sql"]), np.array(base), atol=1e-2)
    assert not np.allclose(np.array(refs["poem"]), np.array(refs["sql"]), atol=1e-2)


def test_switching_is_cheap_and_shares_base_weights(tiny_hf_llama, two_adapters):
    from mlx_qlora.model.model_io import load

    model, _ = load(tiny_hf_llama)
    q = model.model.layers[0].self_attn.q_proj.weight
    aset = AdapterSet(model)
    for name, path in two_adapters.items():
        aset.add(name, path)
    # the base weight object is the very same array under the wrapper
    assert model.model.layers[0].self_attn.q_proj.base.weight is q
    t0 = time.perf_counter()
    for _ in range(100):
        aset.activate("sql")
        aset.activate("poem")
    per_switch_ms = (time.perf_counter() - t0) / 200 * 1e3
    print(f"adapter switch: {per_switch_ms:.3f} ms")


def test_parse_adapter_specs():
    specs = parse_adapter_specs(["sql=/a/b", "/x/poem_v2"])
    assert [(s.name, str(s.path)) for s in specs] == [("sql", "/a/b"), ("poem_v2", "/x/poem_v2")]
    with pytest.raises(UserError, match="given twice"):
        parse_adapter_specs(["a=/x", "a=/y"])
    with pytest.raises(UserError, match="bad adapter name"):
        parse_adapter_specs(["base=/x"])
    with pytest.raises(UserError, match="bad adapter name"):
        parse_adapter_specs(["=/x"])


def test_bad_adapters_are_user_errors(tiny_hf_llama, tmp_path, two_adapters):
    from mlx_qlora.model.model_io import load

    model, _ = load(tiny_hf_llama)
    aset = AdapterSet(model)
    with pytest.raises(UserError, match="not found"):
        aset.add("x", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="lacks adapter_config.json"):
        aset.add("x", tmp_path / "empty")
    dora = make_adapter(tiny_hf_llama, tmp_path / "dora", seed=1)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="DoRA"):
        aset.add("x", dora)
    other = tmp_path / "other_model"
    import tiny

    tiny.write_hf_dir(other, hidden=32, intermediate=64)
    wrong = make_adapter(other, tmp_path / "wrong", seed=1)
    with pytest.raises(UserError, match="different base model"):
        aset.add("x", wrong)
    aset.add("sql", two_adapters["sql"])
    with pytest.raises(UserError, match="unknown adapter 'nope'.*sql"):
        aset.activate("nope")
