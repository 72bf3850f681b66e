"""MLX model (+ adapter) -> GGUF through gguf-py: merged model files and llama.cpp LoRA adapters.

Merged file: the architecture keys (names.CONFIG_KEYS), rope and norm settings and what the
family adds (model/archs: soft-capping, sliding window, multipliers, rope factor tensors), the
tokenizer (export.vocab), and every tensor under its llama.cpp name (gguf-py's table for the
architecture). llama.cpp's interleaved-rope families (llama, smollm3, granite) keep Q/K rows in
that order, so those rows are permuted (quant.permute_qk) - for quantized tensors the packed
codes, scales and biases alike, since quantization groups run along a row; Gemma's norms are
stored as 1 + w. Quantized tensors go through export.blocks: exact copies
where the MLX groups are GGUF blocks, re-quantization (with its error reported) elsewhere.

Adapter file (llama.cpp ``--lora``): general.type "adapter", adapter.type "lora",
adapter.lora.alpha (float32; llama.cpp scales by alpha / rank), and per adapted weight W named
``<gguf name>`` the tensors ``<gguf name>.lora_a`` (r, in) and ``.lora_b`` (out, r) in row-major
terms, i.e. the transposes of our (in, r) / (r, out) factors; lora_b rows get W's Q/K permutation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..errors import UserError, require
from ..model import archs, names
from ..model.model_io import check_model_dir
from ..model.quant import permute_qk
from ..train.adapter_files import read_adapter
from . import ExportConfig, ExportReport
from .blocks import AT_LEAST, BLOCK_TYPES, Packed, exact_block_type, float_tensor, fp16_exact, quantized_tensor
from .fuse import merge_weights, read_weights

# --type -> general.file_type (llama_ftype): what llama.cpp reports as the file's "type".
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
# Q/K tensors whose rows llama.cpp permutes, -> the config key holding their head count.
QK_HEADS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def gguf_family(config: dict):
    """The architecture family (model/archs) of ``config``, or one line saying why llama.cpp
    cannot run this model as mlx-lm does."""
    family = archs.for_model_type(config.get("model_type"), context="cannot export to GGUF: ")
    why = family.export_check(config)
    if why:
        raise UserError(f"cannot export this {family.family} model to GGUF: {why}")
    return family


def gguf_arch(config: dict) -> str:
    return gguf_family(config).gguf_arch


def default_type(config: dict) -> str:
    """q4_1 for a 4-bit model (its blocks copy over exactly), else f16."""
    q = config.get("quantization") or {}
    return "q4_1" if q.get("bits") == 4 and q.get("group_size", 0) % 32 == 0 else "f16"


def lossless_type(weights: dict, config: dict) -> tuple[str | None, str]:
    """``(--type, "")`` whose GGUF holds exactly these MLX weights, or ``(None, why not)``.

    Quantized models: every group must be a run of GGUF blocks (4-bit groups of 32*k -> Q4_1,
    8-bit groups with bias -128*scale -> Q8_0) with fp16-exact scales and biases, and no float
    matrix beside them (the file's block type would re-quantize it). Float models: F16/BF16
    when every matrix is that type, else F32 (vectors are F32 in any file).
    """
    import mlx.core as mx

    quantized = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    if not quantized:
        kinds = {weights[k].dtype for k in weights if weights[k].ndim >= 2}
        return ("f16" if kinds == {mx.float16} else "bf16" if kinds == {mx.bfloat16} else "f32"), ""
    type_name = default_type(config)
    if type_name not in BLOCK_TYPES:
        q = config.get("quantization") or {}
        return None, (f"its {q.get('bits')}-bit groups of {q.get('group_size')} weights are no GGUF block type "
                      f"(Q4_1 holds 4-bit groups of 32*k)")
    for m in quantized:
        bits, gs = _bits_group(config, m)
        scales, biases = _np(weights[f"{m}.scales"]), _np(weights[f"{m}.biases"])
        if exact_block_type(bits, gs, scales, biases, AT_LEAST[type_name]) is None:
            return None, f"{m} ({bits}-bit groups of {gs}) has no exact {type_name.upper()} or Q8_0 form"
        if not (fp16_exact(scales) and fp16_exact(biases)):
            return None, (f"its quantization scales are {str(weights[f'{m}.scales'].dtype).split('.')[-1]} "
                          f"values that GGUF blocks (fp16) would round")
    for k, w in weights.items():
        if k.endswith(".weight") and w.ndim >= 2 and k[: -len(".weight")] not in quantized:
            return None, f"{k} is a float matrix that a {type_name.upper()} file would re-quantize"
    return type_name, ""


def write_model_metadata(w, config: dict, arch: str, type_name: str, name: str) -> None:
    import gguf

    family = archs.for_model_type(config["model_type"])

    w.add_type("model")
    w.add_name(name)
    for key, hf_key in names.CONFIG_KEYS.items():
        value = config.get(hf_key)
        if key == "attention.head_count_kv" and value is None:
            value = config["num_attention_heads"]
        if value is None:
            continue
        if isinstance(value, float):  # eps and rope base are float32 in GGUF
            w.add_float32(f"{arch}.{key}", float(value))
        else:
            w.add_uint32(f"{arch}.{key}", int(value))
    head_dim = family.head_dim(config)
    w.add_rope_dimension_count(family.rotary_dims(config))
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    family.write_meta(w, config)   # rope scaling, soft-capping, sliding window, multipliers, ...
    w.add_vocab_size(int(config["vocab_size"]))
    w.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[type_name]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _np(a) -> np.ndarray:
    """mx.array -> numpy; float tensors (bf16 has no numpy type) as float32."""
    import mlx.core as mx

    if mx.issubdtype(a.dtype, mx.floating):
        a = a.astype(mx.float32)
    return np.array(a)


def _bits_group(config: dict, module: str) -> tuple[int, int]:
    q = config["quantization"]
    own = q.get(module) if isinstance(q.get(module), dict) else {}
    return int(own.get("bits", q["bits"])), int(own.get("group_size", q["group_size"]))


def model_tensors(weights: dict, config: dict, arch: str, type_name: str):
    """Yield ``(gguf name, Packed)`` for every tensor of the model, then the family's generated
    ones (rope frequency factors)."""
    family = archs.for_model_type(config["model_type"])
    permute = family.permute_qk
    for key in sorted(weights):
        if key.endswith((".scales", ".biases")):
            continue
        gname = archs.gguf_name(family, key)
        require(gname is not None, f"tensor {key} has no GGUF name; this {config['model_type']} layout "
                                   "is not supported by the exporter")
        module = key.rsplit(".", 1)[0]
        heads = config.get(QK_HEADS.get(gname.split(".")[-2], ""), None) if permute else None
        if key == f"{module}.weight" and f"{module}.scales" in weights:
            parts = [_np(weights[f"{module}.{s}"]) for s in ("weight", "scales", "biases")]
            if heads:
                parts = [permute_qk(p, heads) for p in parts]
            bits, gs = _bits_group(config, module)
            yield gname, quantized_tensor(gname, *parts, bits, gs, type_name)
        else:
            a = _np(weights[key])
            if family.norm_offset and key.endswith("norm.weight"):
                a = a + np.float32(family.norm_offset)   # llama.cpp multiplies by the stored (1 + w)
            yield gname, float_tensor(permute_qk(a, heads) if heads else a, type_name)
    for gname, a in family.extra_tensors(config).items():
        yield gname, Packed(np.ascontiguousarray(a, dtype=np.float32), "F32", "float")


def _add(writer, report: ExportReport, name: str, p: Packed) -> None:
    import gguf

    raw = gguf.GGMLQuantizationType[p.ggml_type] if p.data.dtype == np.uint8 else None
    writer.add_tensor(name, p.data, raw_dtype=raw)
    report.add(name, p.ggml_type, p.how, p.rel_err)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_merged_gguf(cfg: ExportConfig) -> ExportReport:
    import gguf

    from .vocab import vocab_from_model_dir

    model_dir = check_model_dir(cfg.model)
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_arch(config)
    type_name = cfg.type or default_type(config)
    weights = read_weights(model_dir)
    kind = "merged GGUF"
    if cfg.adapter:
        weights, config = merge_weights(weights, config, read_adapter(cfg.adapter))
        kind = "merged GGUF (base + adapter)"
    vocab = vocab_from_model_dir(model_dir, config)
    report = ExportReport(out=cfg.out, kind=kind, notes=list(vocab.warnings))
    with atomic_file(cfg.out, cfg.force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        write_model_metadata(writer, config, arch, type_name, model_dir.name)
        vocab.write(writer)
        for name, packed in model_tensors(weights, config, arch, type_name):
            _add(writer, report, name, packed)
        _write(writer)
        report.size_bytes = tmp.stat().st_size
    if cfg.modelfile:
        from .modelfile import write_modelfile

        report.notes.append(f"Ollama: {write_modelfile(Path(cfg.out), vocab)}")
    return report


def adapter_tensors(adapter, config: dict, arch: str, type_name: str):
    """Yield ``(gguf name, Packed)`` for the llama.cpp LoRA tensors of ``adapter``."""
    family = archs.for_gguf_arch(arch)
    permute = family.permute_qk
    dtype = np.float16 if type_name in ("f16", "bf16") else np.float32  # llama.cpp takes F32/F16 LoRA
    for module, (a, b) in sorted(adapter.pairs.items()):
        gname = archs.gguf_name(family, f"{module}.weight")
        require(gname is not None, f"adapter module {module} has no GGUF name; llama.cpp cannot apply it")
        la, lb = np.array(a).T, np.array(b).T          # (r, in), (out, r)
        heads = config.get(QK_HEADS.get(gname.split(".")[-2], ""), None) if permute else None
        if heads:
            lb = permute_qk(lb, heads)
        t = "F16" if dtype == np.float16 else "F32"
        yield f"{gname}.lora_a", Packed(np.ascontiguousarray(la, dtype=dtype), t, "float")
        yield f"{gname}.lora_b", Packed(np.ascontiguousarray(lb, dtype=dtype), t, "float")


def write_lora_gguf(adapter, path: Path, arch: str, config: dict, type_name: str = "f32",
                    report: ExportReport | None = None) -> Path:
    """Write ``adapter`` as a llama.cpp LoRA GGUF at ``path`` (the caller makes it atomic).

    ``config`` needs only the head counts (num_attention_heads, num_key_value_heads) for the Q/K
    permutation of lora_b, so a bare base GGUF's metadata is enough (the llama.cpp engine).
    """
    import gguf

    archs.for_gguf_arch(arch)   # one line naming the supported ones
    ranks = {int(a.shape[1]) for a, _ in adapter.pairs.values()}
    require(len(ranks) == 1, f"adapter {adapter.path} mixes ranks {sorted(ranks)}; llama.cpp needs one rank")
    report = report or ExportReport(out=str(path), kind="LoRA GGUF")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_name(adapter.path.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp applies alpha / rank; ours is `scale`, so alpha = scale * rank (rsLoRA too)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    for name, packed in adapter_tensors(adapter, config, arch, type_name):
        _add(writer, report, name, packed)
    _write(writer)
    return Path(path)


def export_adapter_gguf(cfg: ExportConfig) -> ExportReport:
    model_dir = check_model_dir(cfg.model)
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_arch(config)
    adapter = read_adapter(cfg.adapter)
    report = ExportReport(out=cfg.out, kind="LoRA GGUF")
    with atomic_file(cfg.out, cfg.force) as tmp:
        write_lora_gguf(adapter, tmp, arch, config, cfg.type or "f32", report)
        report.size_bytes = tmp.stat().st_size
    report.notes.append(f"rank {adapter.rank}, alpha {adapter.alpha:g} (scale {adapter.scale:g}); "
                        f"use: llama-cli -m BASE.gguf --lora {cfg.out}")
    if cfg.modelfile:
        from .modelfile import write_modelfile
        from .vocab import vocab_from_model_dir

        report.notes.append("Ollama: " + str(write_modelfile(Path(cfg.out), vocab_from_model_dir(model_dir, config),
                                                             adapter_of=cfg.base_gguf or "")))
    return report
