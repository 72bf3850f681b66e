"""PEFT export loads in real PEFT with MLX's logits; PEFT import gives back the same adapter."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lora_fixtures import ALL, converted, mlx_logits, mlx_model, write_adapter
from tolerance import tol_abs

TOKENS = [5, 80, 17, 200, 33, 140, 7, 99, 251, 64, 12, 3]


@pytest.fixture(scope="module")
def f32(tmp_path_factory, tiny_hf_llama):
    return converted(tmp_path_factory, tiny_hf_llama, "peft_llama_f32", quantize=False, dtype="float32")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, f32):
    # layers [1] only: exercises layers_to_transform
    return write_adapter(tmp_path_factory.mktemp("peft_ad") / "adapter", f32, targets=ALL, layers=[1], seed=9,
                         b_std=0.2)


def _export(model, adapter, out):
    from mlx_qlora.export import ExportConfig, run_export

    return run_export(ExportConfig(model=str(model), adapter=str(adapter), to="peft", out=str(out)))


def test_peft_layout(f32, adapter, tmp_path):
    out = tmp_path / "peft"
    _export(f32, adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert sorted(cfg["target_modules"]) == sorted(t.split(".")[-1] for t in ALL)
    assert cfg["layers_to_transform"] == [1]
    from safetensors.numpy import load_file

    t = load_file(str(out / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (8, 64)    # (r, in)
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)       # (out, r)
    assert len(t) == 2 * len(ALL)


def test_import_round_trip(f32, adapter, tmp_path):
    from safetensors.numpy import load_file

    from mlx_qlora.export.peft import run_import_peft
    from mlx_qlora.train.adapter_files import read_adapter

    _export(f32, adapter, tmp_path / "peft")
    back = run_import_peft(str(tmp_path / "peft"), str(tmp_path / "back"))
    a, b = load_file(str(adapter / "adapters.safetensors")), load_file(str(back / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ad = read_adapter(back)
    assert ad.scale == 2.0 and ad.rank == 8 and ad.config["layers"] == [1]
    ref = mlx_logits(mlx_model(f32, adapter)[0], TOKENS)
    assert np.abs(mlx_logits(mlx_model(f32, back)[0], TOKENS) - ref).max() == 0.0


def test_import_errors_are_one_line(tmp_path):
    from mlx_qlora.errors import UserError
    from mlx_qlora.export.peft import run_import_peft

    with pytest.raises(UserError, match="not a directory"):
        run_import_peft(str(tmp_path / "none"), str(tmp_path / "o"))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="lacks adapter_model.safetensors"):
        run_import_peft(str(tmp_path / "d"), str(tmp_path / "o"))


@pytest.mark.cpu_math
def test_loads_in_real_peft_with_mlx_logits(f32, adapter, tiny_hf_llama, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _export(f32, adapter, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf_llama), torch_dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor([TOKENS])).logits[0].numpy()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0].numpy()
    ref = mlx_logits(mlx_model(f32, adapter)[0], TOKENS)
    print(f"PEFT vs MLX max |dlogit| {np.abs(got - ref).max():.2e}; adapter effect {np.abs(ref - plain).mean():.3f}")
    assert np.abs(plain - mlx_logits(mlx_model(f32)[0], TOKENS)).max() < tol_abs(1e-3, plain)
    assert np.abs(got - ref).max() < tol_abs(1e-3, ref)
    assert np.abs(ref - plain).mean() > 0.1  # the adapter is really applied
