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


def test_gguf_of_another_architecture(tmp_path):
    import gguf

    g = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(g), "bert")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, out = run_cli("convert", g, "-o", tmp_path / "o")
    assert_one_line_error(code, out, "'bert'", "supported:", "gemma3", "phi3", "olmo2")
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
