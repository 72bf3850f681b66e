"""``mlx_qlora fuse``: merge a LoRA adapter into its base model, W' = W + scale * (A @ B)^T.

The adapter is read by ``adapter_files.read_adapter`` (``y = x @ W.T + scale * (x @ A) @ B``).

Quantized modules are dequantized, merged in float32 and re-quantized with the base's bits and
group size. The new scales and biases are rounded to fp16 values and the codes recomputed
against them, so a fused 4-bit model exports to GGUF Q4_1 blocks without any rounding (GGUF
keeps d and m as fp16). Modules the adapter does not touch are copied bit for bit. The fused
config records the adapter's fingerprint; merging the same adapter again changes nothing.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import require
from ..model.model_io import GGUF_RECORD, check_model_dir, write_model_dir
from ..train.adapter_files import Adapter, read_adapter


def _quant_of(config: dict, module: str) -> tuple[int, int]:
    q = config["quantization"]
    own = q.get(module) if isinstance(q.get(module), dict) else {}
    return int(own.get("bits", q["bits"])), int(own.get("group_size", q["group_size"]))


def quantize_fp16_grid(w, bits: int, group_size: int):
    """MLX affine quantization whose scales and biases are fp16 values (stored in w's dtype)."""
    import mlx.core as mx

    _, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    s = s.astype(mx.float16).astype(mx.float32)
    b = b.astype(mx.float16).astype(mx.float32)
    rows, cols = w.shape
    wg = w.reshape(rows, -1, group_size)
    safe = mx.where(s == 0, 1.0, s)[..., None]
    codes = mx.clip(mx.round((wg - b[..., None]) / safe), 0, (1 << bits) - 1).astype(mx.uint32)
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    packed = (codes.reshape(rows, -1, per_word) << shifts).sum(axis=-1).astype(mx.uint32)
    return packed, s, b


def merge_weights(weights: dict, config: dict, adapter: Adapter, dequantize: bool = False) -> tuple[dict, dict]:
    """Fused ``(weights, config)``: adapted modules merged, quantized ones re-quantized (or, with
    ``dequantize``, every quantized module turned to float)."""
    import mlx.core as mx

    config = dict(config)
    out = dict(weights)
    already = adapter.fingerprint in config.get("fused_adapters", [])
    pairs = {} if already else adapter.pairs  # this exact adapter is already in these weights
    missing = [m for m in pairs if f"{m}.weight" not in weights]
    require(not missing, f"adapter modules {', '.join(missing[:3])} are not in the model; "
                         "was the adapter trained on another base model?")
    quantized = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    for module in quantized if dequantize else []:
        bits, gs = _quant_of(config, module)
        dtype = weights[f"{module}.scales"].dtype
        out[f"{module}.weight"] = mx.dequantize(out.pop(f"{module}.weight"), out.pop(f"{module}.scales"),
                                                out.pop(f"{module}.biases"), group_size=gs, bits=bits).astype(dtype)
    for module, (a, b) in pairs.items():
        if f"{module}.scales" in out:
            bits, gs = _quant_of(config, module)
            dtype = out[f"{module}.scales"].dtype
            w = mx.dequantize(out[f"{module}.weight"], out[f"{module}.scales"].astype(mx.float32),
                              out[f"{module}.biases"].astype(mx.float32), group_size=gs, bits=bits)
        else:
            dtype, w = out[f"{module}.weight"].dtype, out[f"{module}.weight"].astype(mx.float32)
        require(w.shape == (b.shape[1], a.shape[0]),
                f"adapter {module} is shaped for a {a.shape[0]}->{b.shape[1]} layer but the model's is "
                f"{w.shape[1]}->{w.shape[0]}; the adapter belongs to another base model")
        w = w + adapter.scale * (a @ b).T
        if f"{module}.scales" in out:
            q, s, bias = quantize_fp16_grid(w, bits, gs)
            out.update({f"{module}.weight": q, f"{module}.scales": s.astype(dtype), f"{module}.biases": bias.astype(dtype)})
        else:
            out[f"{module}.weight"] = w.astype(dtype)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if not already:
        config["fused_adapters"] = list(config.get("fused_adapters", [])) + [adapter.fingerprint]
    mx.eval(out)
    return out, config


def read_weights(model_dir: Path) -> dict:
    import mlx.core as mx

    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    require(bool(weights), f"{model_dir} has no *.safetensors weights; is it an MLX model directory?")
    return weights


@dataclass
class FuseConfig:
    model: str                # MLX model directory (the base the adapter was trained on)
    adapter: str              # adapter directory
    out_dir: str
    dequantize: bool = False  # write float weights instead of re-quantizing
    force: bool = False

    def __post_init__(self):
        require(bool(self.out_dir), "an output directory is required: pass -o DIR")
        require(Path(self.out_dir).resolve() != Path(self.model).resolve(),
                f"-o {self.out_dir} is the base model itself; write the fused model to a new directory")


def run_fuse(cfg: FuseConfig) -> Path:
    model_dir = check_model_dir(cfg.model)
    adapter = read_adapter(cfg.adapter)
    config = json.loads((model_dir / "config.json").read_text())
    already = adapter.fingerprint in config.get("fused_adapters", [])
    weights, config = merge_weights(read_weights(model_dir), config, adapter, cfg.dequantize)
    with atomic_dir(cfg.out_dir, cfg.force) as tmp:
        write_model_dir(tmp, weights, config)
        for f in model_dir.iterdir():  # tokenizer, chat template, generation config, ... (not the base's GGUF)
            if f.is_file() and f.suffix not in (".safetensors", ".gguf") and \
                    f.name not in ("config.json", "model.safetensors.index.json", GGUF_RECORD):
                shutil.copy2(f, tmp / f.name)
    what = "already contained this adapter; copied unchanged" if already else \
        f"merged {len(adapter.pairs)} modules (scale {adapter.scale:g}, rank {adapter.rank})"
    kind = "float" if cfg.dequantize else ("re-quantized with the base's settings" if "quantization" in config else "float")
    print(f"fused {adapter.path} into {model_dir} -> {cfg.out_dir}: {what}; weights {kind}")
    return Path(cfg.out_dir)


def attach_adapter(model, adapter: Adapter):
    """Wrap the adapted linears of a loaded mlx-lm model so it computes base + adapter
    (unmerged, in float32): the reference fuse and export are checked against."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    class LoRAReference(nn.Module):
        def __init__(self, base, a, b, scale):
            super().__init__()
            self.base, self.lora_a, self.lora_b, self.scale = base, a, b, scale

        def __call__(self, x):
            return self.base(x) + self.scale * ((x @ self.lora_a) @ self.lora_b).astype(x.dtype)

    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)))
    missing = [m for m in adapter.pairs if m not in modules]
    require(not missing, f"adapter modules {', '.join(missing[:3])} are not in the model")
    model.update_modules(tree_unflatten([(m, LoRAReference(modules[m], a, b, adapter.scale))
                                         for m, (a, b) in adapter.pairs.items()]))
    return model
