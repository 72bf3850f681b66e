"""Bad input for the architecture families: an unknown architecture, a config key the family
needs, a feature mlx-lm or llama.cpp would run differently, a GGUF of another architecture ->
one line naming it (and the supported list), exit 2, nothing written."""
from __future__ import annotations

import json

import pytest

import arch_models as am
from test_cli_errors import assert_one_line_error, run_cli

pytest.importorskip("torch")


def _hf(tmp_path, family, **edit):
    src = am.write_family(tmp_path / "hf", family)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in edit.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("family,edit,needles", [
    ("qwen3", {"model_type": "gpt_bigcode"}, ["'gpt_bigcode'", "supported:", "qwen3", "gemma3_text", "granite"]),
    ("qwen3", {"head_dim": None}, ["'head_dim'", "qwen3"]),
    ("gemma3", {"head_dim": None}, ["'head_dim'", "gemma3"]),
    ("granite", {"logits_scaling": None}, ["'logits_scaling'", "granite"]),
    ("gemma3", {"final_logit_softcapping": 30.0}, ["final_logit_softcapping"]),
    ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 5, "short_factor": [1.0] * 5},
              "original_max_position_embeddings": 256}, ["longrope", "6 factors"]),
    ("phi3", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, ["phi3 rope scaling 'yarn'"]),
])
def test_convert_refuses_in_one_line(tmp_path, family, edit, needles):
    src = _hf(tmp_path, family, **edit)
    code, out = run_cli("convert", src, "-o", tmp_path / "o")
    assert_one_line_error(code, out, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["bert", "mamba"])
def test_gguf_of_another_architecture(tmp_path, arch):
    import gguf

    g = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(g), arch)
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, out = run_cli("convert", g, "-o", tmp_path / "o")
    assert_one_line_error(code, out, f"'{arch}'", "supported:", "gemma3", "phi3", "olmo2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,edit,needles", [
    ("gemma3", {"sliding_window_pattern": 4}, ["sliding_window_pattern 4", "llama.cpp"]),
    ("gemma3", {"rope_local_base_freq": 20000.0}, ["rope_local_base_freq", "10000"]),
    ("gemma2", {"query_pre_attn_scalar": 32}, ["query_pre_attn_scalar 32", "llama.cpp"]),
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, ["no_rope_layers", "every 4th"]),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'"]),
])
def test_export_refuses_what_llamacpp_would_run_differently(tmp_path, family, edit, needles):
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    src = am.write_family(tmp_path / "hf", family)
    mdir = tmp_path / "mlx"
    run_convert(ConvertConfig(source=str(src), out_dir=str(mdir), quantize=False, dtype="float32"))
    cfg = {**json.loads((mdir / "config.json").read_text()), **edit}
    (mdir / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("export", mdir, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert_one_line_error(code, out, "cannot export", *needles)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


@pytest.mark.parametrize("factor", [8.0, 32.0])   # Llama 3.1 and 3.2
def test_llama3_rope_parameters_recovered_from_rope_freqs(factor):
    """A llama.cpp GGUF keeps llama3 rope scaling only as per-pair divisors: the parameters found
    from them give the same divisors (so the same model); divisors no parameters give, refused."""
    import numpy as np

    from mlx_qlora.model.archs.llama import llama3_freq_factors, llama3_from_factors

    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    divisors = llama3_freq_factors(cfg)
    assert 1.0 < divisors[31] < factor   # the file has blended pairs (29-34), the case to solve
    rs = llama3_from_factors(divisors, {k: v for k, v in cfg.items() if k != "rope_scaling"})
    assert rs is not None and rs["factor"] == factor
    assert abs(rs["low_freq_factor"] - 1.0) < 1e-3 and abs(rs["high_freq_factor"] - 4.0) < 1e-3
    np.testing.assert_allclose(llama3_freq_factors({**cfg, "rope_scaling": rs}), divisors, rtol=1e-6)
    bent = divisors.copy()
    bent[32] *= 1.1   # no llama3 parameters give this
    assert llama3_from_factors(bent, cfg) is None
