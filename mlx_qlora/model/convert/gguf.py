"""GGUF file -> MLX model directory, keeping Q4_0 / Q4_1 / Q8_0 blocks exactly.

``mx.load`` on a .gguf returns those block types already as MLX group-32 (weight, scales,
biases) triples (tests check them against gguf-py's own dequantization). Other quantized types
are dequantized with gguf-py and re-quantized with the requested settings; float tensors load
directly. llama.cpp stores llama Q/K rows permuted for its rope layout: undone here.

When every tensor came over as it was (blocks kept, floats widened or kept), the directory
records the source GGUF (``model_io.record_gguf``): the llama.cpp engine runs that very file
on a CPU, with no export step and no flag.
"""
from __future__ import annotations

import numbers
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from ...atomic import atomic_dir
from ...errors import UserError, require
from .. import archs, names
from ..model_io import record_gguf, write_model_dir
from ..quant import GGUF_EXACT, GGUF_FLOAT, QuantStats, bits_per_weight, quantize, unpermute_qk
from . import ConvertConfig, ConvertReport
from .hf import CONFIG_INTS, check_config

# magic, version, tensor count, metadata count; then per key/value and per tensor at least:
GGUF_HEADER = struct.Struct("<4sIQQ")
MIN_KV_BYTES = 8 + 1 + 4 + 1              # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


def check_gguf_header(path: Path) -> None:
    """The 24-byte header, checked the way llama.cpp does before trusting any count in it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER.size)
    require(len(head) == GGUF_HEADER.size, f"{path} is {size} bytes, too short for a GGUF header; "
                                           "the file is truncated: download it again")
    magic, version, n_tensors, n_kv = GGUF_HEADER.unpack(head)
    require(magic == b"GGUF", f"{path} does not start with the GGUF magic (found {magic!r}); "
                              "give a .gguf file from llama.cpp's converter")
    if version & 0xFFFF == 0:  # a big-endian file: gguf-py reads those too
        version, n_tensors, n_kv = struct.unpack(">IQQ", head[4:])
    require(version in (2, 3), f"{path} is GGUF version {version}; versions 2 and 3 are supported: "
                               "re-convert it with a current llama.cpp")
    room = size - GGUF_HEADER.size
    for count, what, least in ((n_tensors, "tensor count", MIN_TENSOR_INFO_BYTES),
                               (n_kv, "metadata count", MIN_KV_BYTES)):
        require(count * least <= room, f"{path} gives a {what} of {count}, more than its {size} bytes can "
                                       "hold; the file is corrupt: download it again")


def read_gguf(path: Path):
    """``(reader, metadata dict)``; a truncated or corrupt file becomes one UserError line."""
    import gguf

    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {key: field.contents() for key, field in reader.fields.items()}
        for t in reader.tensors:  # touching each tensor's data checks it lies inside the file
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct.error/... on bad bytes
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                        "the file may be truncated or corrupt: download it again") from None
    return reader, meta


def gguf_config(meta: dict, tensor_names) -> dict:
    """config.json (mlx-lm keys) from GGUF metadata; the family adds its own keys (archs)."""
    arch = meta.get("general.architecture")
    family = archs.for_gguf_arch(arch)
    cfg = {"model_type": family.model_types[0]}
    for key, hf_key in names.CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            cfg[hf_key] = meta[f"{arch}.{key}"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
               if k not in cfg]
    if missing:
        raise UserError(f"GGUF metadata lacks {', '.join(missing)}; the file is incomplete: download it again")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rms_norm_eps", 1e-5)
    cfg.setdefault("rope_theta", 10000.0)
    bad = "the file is corrupt or incomplete: download it again"
    check_config(cfg, "GGUF metadata", bad, required=tuple(k for k in CONFIG_INTS if k != "vocab_size"))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    key_len = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", head_dim))
    require(isinstance(key_len, numbers.Integral) and key_len > 0,
            f"GGUF metadata: {arch}.attention.key_length is {key_len!r}; {bad}")
    if key_len != head_dim:
        cfg["head_dim"] = int(key_len)
    elif family.required and "head_dim" in family.required:
        cfg["head_dim"] = int(head_dim)
    family.from_gguf(meta, arch, cfg, tensor_names)
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg["vocab_size"] = len(tokens) if isinstance(tokens, list) else meta.get(f"{arch}.vocab_size")
    check_config(cfg, "GGUF metadata", bad, required=("vocab_size",))
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    for name, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if key in meta:
            require(isinstance(meta[key], numbers.Integral) and 0 <= meta[key] < cfg["vocab_size"],
                    f"GGUF metadata: {key} is {meta[key]!r}, not a token of the {cfg['vocab_size']}; {bad}")
            cfg[name] = int(meta[key])
    # float32 metadata (1e-5 stored as 9.99999974e-06) -> the shortest decimal that round-trips
    cfg = {k: (float(np.format_float_positional(np.float32(v), unique=True)) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (int, np.integer))
               and not isinstance(v, bool) else v) for k, v in cfg.items()}
    return cfg


def convert_gguf(path: Path, cfg: ConvertConfig) -> ConvertReport:
    import mlx.core as mx
    from rich.progress import track

    reader, meta = read_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    config = gguf_config(meta, {t.name: t for t in reader.tensors})
    report = ConvertReport(source=str(path), out_dir=cfg.out_dir, model_type=config["model_type"])
    family = archs.for_gguf_arch(meta["general.architecture"])
    to_mlx = archs.gguf_to_mlx_modules(family, config)
    types = {n: k for n, k in types.items() if n not in family.gguf_extra}
    unknown = [n for n in types if n.rsplit(".", 1)[0] not in to_mlx]
    if unknown:
        raise UserError(f"GGUF tensors {', '.join(unknown[:3])} have no known mapping for "
                        f"{config['model_type']}; this file's layout is not supported")

    from ..vocab import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(meta, meta["general.architecture"])
    dtype = cfg.resolved_dtype()
    direct = all(t in GGUF_EXACT or t in GGUF_FLOAT for t in types.values())
    loaded = mx.load(str(path)) if direct else {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    stats, weights, quant_of = QuantStats(), {}, {}

    for t in track([t for t in reader.tensors if t.name in types], description="converting tensors", transient=True):
        base, suffix = t.name.rsplit(".", 1)
        module = to_mlx[base]
        kind = types[t.name]
        n_head = heads.get(base.split(".")[-1]) if family.permute_qk else None
        fix = (lambda a: unpermute_qk(a, n_head)) if n_head else (lambda a: a)
        if kind in GGUF_EXACT and not cfg.requantize and cfg.quantize and direct:
            for part in ("weight", "scales", "biases"):
                a = fix(loaded[f"{base}.{part}"])
                weights[f"{module}.{part}"] = a if part == "weight" else a.astype(dtype)
            quant_of[module] = GGUF_EXACT[kind]
            report.exact.append(module)
            continue
        w = _as_float(t, loaded, base, kind)
        w = fix(w)
        if family.norm_offset and t.name.endswith("norm.weight"):
            w = w - family.norm_offset   # llama.cpp stores Gemma's (1 + w)
        is_matrix = suffix == "weight" and w.ndim == 2
        if is_matrix and cfg.quantize and w.shape[1] % cfg.q_group_size == 0:
            q, s, b = quantize(w, cfg.q_bits, cfg.q_group_size, stats)
            weights.update({f"{module}.weight": q, f"{module}.scales": s.astype(dtype),
                            f"{module}.biases": b.astype(dtype)})
            quant_of[module] = (cfg.q_bits, cfg.q_group_size)
            report.requantized.append(module)
        else:
            weights[f"{module}.{suffix}"] = w.astype(dtype)
            report.floats.append(module)

    if quant_of:
        (bits, gs), _ = Counter(quant_of.values()).most_common(1)[0]
        config["quantization"] = {"group_size": gs, "bits": bits, "mode": "affine"}
        for module, (b, g) in quant_of.items():  # per-module overrides, in mlx-lm's format
            if (b, g) != (bits, gs):
                config["quantization"][module] = {"group_size": g, "bits": b}
    report.rel_rms_error = stats.rel_rms
    report.bits_per_weight = bits_per_weight(weights, {m: b for m, (b, _) in quant_of.items()})
    with atomic_dir(cfg.out_dir, cfg.force) as tmp:
        write_model_dir(tmp, weights, config, tokenizer)
        report.size_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        if _same_weights(types, report, dtype, cfg) and not family.norm_offset:  # (1+w)-1 rounds
            record_gguf(tmp, path, "converted from it, every block and float kept exactly")
    return report


def _same_weights(types: dict, report: ConvertReport, dtype, cfg: ConvertConfig) -> bool:
    """The MLX weights are the GGUF's: no block re-quantized or dequantized, and every float
    (tensors, block scales) cast to a type that holds it exactly."""
    import mlx.core as mx

    if report.requantized or (not cfg.quantize and any(t in GGUF_EXACT for t in types.values())):
        return False
    if dtype == mx.float32:
        return True
    # fp16 holds the blocks' fp16 scales and F16 tensors, not F32/BF16 ones; bf16 not even the scales
    return dtype == mx.float16 and all(t == "F16" or t in GGUF_EXACT for t in types.values())


def _as_float(t, loaded: dict, base: str, kind: str):
    """One GGUF tensor as an fp32 mx.array in (rows, cols) order."""
    import mlx.core as mx

    if kind in GGUF_FLOAT and t.name in loaded:
        return loaded[t.name].astype(mx.float32)
    if kind in GGUF_EXACT and f"{base}.scales" in loaded:
        bits, gs = GGUF_EXACT[kind]
        return mx.dequantize(loaded[f"{base}.weight"], loaded[f"{base}.scales"].astype(mx.float32),
                             loaded[f"{base}.biases"].astype(mx.float32), group_size=gs, bits=bits)
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor type {kind} (tensor {t.name}) cannot be dequantized by gguf-py; "
                        "use a Q4_0, Q4_1, Q8_0, Q*_K, F16 or F32 file") from None
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    return mx.array(np.asarray(arr, dtype=np.float32).reshape(shape))
