"""convert: tiny HF directories and GGUF files -> MLX, checked against reference models."""
import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401
import mlx.core as mx

import tiny
from mlx_qlora.model import model_io
from mlx_qlora.model.convert import ConvertConfig, run_convert
from mlx_qlora.model.quant import GGUF_EXACT, unpermute_qk

TOKENS = [[257, 108, 111, 276, 69, 67, 84, 32, 120, 5, 99, 284, 10]]


def logits(model_dir_or_model, tokens=TOKENS):
    model = model_io.load(model_dir_or_model, dtype=mx.float32)[0] if not hasattr(model_dir_or_model, "layers") \
        else model_dir_or_model
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_dir_unquantized_is_exact(arch, tmp_path, tiny_hf_llama, tiny_hf_qwen2):
    src = tiny_hf_llama if arch == "llama" else tiny_hf_qwen2
    rep = run_convert(ConvertConfig(source=str(src), out_dir=str(tmp_path / "o"), quantize=False, dtype="float32"))
    assert rep.requantized == [] and rep.rel_rms_error == 0
    from mlx_lm import load

    ref, _ = load(str(src))  # mlx-lm's own loading of the HF directory (fp32)
    assert np.allclose(logits(tmp_path / "o"), logits(ref), atol=1e-5)


@pytest.mark.cpu_math
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 64)])
def test_hf_dir_quantized_error_tracks_reported_error(arch, bits, gs, tmp_path, tiny_hf_llama, tiny_hf_qwen2):
    src = tiny_hf_llama if arch == "llama" else tiny_hf_qwen2
    rep = run_convert(ConvertConfig(source=str(src), out_dir=str(tmp_path / "o"), q_bits=bits, q_group_size=gs))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization"] == {"bits": bits, "group_size": gs, "mode": "affine"}
    assert 0 < rep.rel_rms_error < (0.12 if bits == 4 else 0.01)
    # a scale and a bias per group, in the dtype the converter wrote (float32 on CPU, float16 on GPUs)
    scale_bits = 8 * next(v.itemsize for f in (tmp_path / "o").glob("*.safetensors")
                          for k, v in mx.load(str(f)).items() if k.endswith(".scales"))
    assert rep.bits_per_weight == pytest.approx(bits + 2 * scale_bits / gs, abs=0.35)
    from mlx_lm import load

    ref, _ = load(str(src))
    err = rel_err(logits(tmp_path / "o"), logits(ref))
    # logits move about as much as the weights do (two layers compound a little)
    assert err < 3 * rep.rel_rms_error, (err, rep.rel_rms_error)
    assert err > 0.05 * rep.rel_rms_error  # the model really is quantized


def test_rope_parameters_nesting_is_read(tmp_path):
    """transformers 5 nests rope_theta under rope_parameters; mlx-lm alone would use 10000."""
    src = tiny.write_hf_dir(tmp_path / "hf", rope_theta=100000.0)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(cfg))
    run_convert(ConvertConfig(source=str(src), out_dir=str(tmp_path / "o"), quantize=False, dtype="float32"))
    model, _ = model_io.load(tmp_path / "o")
    assert model.args.rope_theta == 100000.0
    # and it matters: the same weights with mlx-lm's fallback theta give different logits
    wrong = tiny.write_hf_dir(tmp_path / "wrong", rope_theta=10000.0)
    right = tiny.write_hf_dir(tmp_path / "right", rope_theta=100000.0)
    from mlx_lm import load

    long = [list(range(1, 200))]
    ours = logits(tmp_path / "o", long)
    assert np.allclose(ours, logits(load(str(right))[0], long), atol=1e-4)
    assert not np.allclose(ours, logits(load(str(wrong))[0], long), atol=1e-2)


def _dequant_gguf_reference(gguf_path, hf_dir, tmp_path):
    """An fp32 HF directory holding gguf-py's own dequantization of every GGUF tensor."""
    import gguf
    from safetensors.numpy import save_file

    from mlx_qlora.model import names

    cfg = json.loads((hf_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg["model_type"] == "llama" and ".attn_q." in t.name:
            a = unpermute_qk(a, cfg["num_attention_heads"])
        if cfg["model_type"] == "llama" and ".attn_k." in t.name:
            a = unpermute_qk(a, cfg["num_key_value_heads"])
        out[names.gguf_to_mlx(t.name)] = a
    ref = tiny.write_hf_dir(tmp_path / "ref", arch=cfg["model_type"], tie=cfg["tie_word_embeddings"])
    save_file(out, str(ref / "model.safetensors"))
    return ref


@pytest.mark.cpu_math
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_gguf_blocks_kept_exactly(arch, qtype, tmp_path, tiny_hf_llama, tiny_hf_qwen2):
    src = tiny_hf_llama if arch == "llama" else tiny_hf_qwen2
    g = tiny.write_gguf(src, tmp_path / "m.gguf", qtype)
    rep = run_convert(ConvertConfig(source=str(g), out_dir=str(tmp_path / "o"), q_group_size=32))
    if qtype in GGUF_EXACT:
        assert rep.requantized == [] and len(rep.exact) == 15 + (arch == "qwen2")
        cfg = json.loads((tmp_path / "o" / "config.json").read_text())
        assert cfg["quantization"]["bits"] == GGUF_EXACT[qtype][0] and cfg["quantization"]["group_size"] == 32
    ref = _dequant_gguf_reference(g, src, tmp_path)
    from mlx_lm import load

    ours, exact_ref = logits(tmp_path / "o"), logits(load(str(ref))[0])
    if qtype in GGUF_EXACT:
        # the same dequantized weights as gguf-py computes: only fp32 summation order differs
        assert np.allclose(ours, exact_ref, atol=2e-4), np.abs(ours - exact_ref).max()
    fp32 = logits(load(str(src))[0])
    bound = {"F32": 1e-5, "F16": 1e-2, "BF16": 3e-2, "Q8_0": 0.02, "Q4_0": 0.35, "Q4_1": 0.3}[qtype]
    assert rel_err(ours, fp32) < max(bound, 3 * rep.rel_rms_error)


def test_mx_load_gguf_matches_gguf_py_dequantization(tmp_path, tiny_hf_llama):
    import gguf

    for qtype in GGUF_EXACT:
        g = tiny.write_gguf(tiny_hf_llama, tmp_path / f"{qtype}.gguf", qtype)
        loaded = mx.load(str(g))
        bits, gs = GGUF_EXACT[qtype]
        for t in gguf.GGUFReader(str(g)).tensors:
            if t.tensor_type.name != qtype:
                continue
            base = t.name[: -len(".weight")]
            ours = mx.dequantize(loaded[f"{base}.weight"], loaded[f"{base}.scales"].astype(mx.float32),
                                 loaded[f"{base}.biases"].astype(mx.float32), group_size=gs, bits=bits)
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
            assert np.array_equal(np.array(ours), theirs.astype(np.float32)), (qtype, t.name)


def test_requantize_flag_requantizes(tmp_path, tiny_hf_llama):
    g = tiny.write_gguf(tiny_hf_llama, tmp_path / "m.gguf", "Q8_0")
    rep = run_convert(ConvertConfig(source=str(g), out_dir=str(tmp_path / "o"), requantize=True, q_group_size=64))
    assert rep.exact == [] and len(rep.requantized) == 15 and rep.rel_rms_error > 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]["group_size"] == 64


def test_converted_dir_keeps_tokenizer_and_chat_template(tmp_path, tiny_hf_llama):
    g = tiny.write_gguf(tiny_hf_llama, tmp_path / "m.gguf", "Q4_1")
    run_convert(ConvertConfig(source=str(g), out_dir=str(tmp_path / "from_gguf")))
    run_convert(ConvertConfig(source=str(tiny_hf_llama), out_dir=str(tmp_path / "from_hf")))
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_hf_llama))
    msgs = [{"role": "user", "content": "SELECT the  name\nFROM x, 123 ü"}]
    for d in ("from_gguf", "from_hf"):
        _, tok = model_io.load(tmp_path / d)
        for text in ["hello world", "  two  spaces", "ümlaut ü 123", "<|im_start|>user\nhi<|im_end|>"]:
            assert tok.encode(text) == ref.encode(text), (d, text)
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.eos_token == "<|im_end|>"
