"""Hugging Face model (hub id or local directory of safetensors) -> MLX model directory."""
from __future__ import annotations

import json
import math
import numbers
import shutil
from pathlib import Path

from ...atomic import atomic_dir
from ...errors import UserError, require
from .. import archs
from ..model_io import normalize_config, write_model_dir
from ..quant import QuantStats, bits_per_weight, quantize
from . import ConvertConfig, ConvertReport

# Files copied verbatim beside the weights so mlx_lm.load (transformers) rebuilds the tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "vocab.json"]


def convert_hub_id(repo_id: str, cfg: ConvertConfig) -> ConvertReport:
    """Download (config, safetensors, tokenizer only) from the hub, then convert the directory."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, no such repo, gated, ...: all end the same way for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download {repo_id} from the Hugging Face hub ({msg}); check the id and "
                        "your network, or download it elsewhere and pass the local directory") from None
    return convert_hf_dir(Path(local), cfg, source=repo_id)


# the hyper-parameters every supported architecture needs, as positive integers
CONFIG_INTS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
OPTIONAL_NUMBERS = ("rms_norm_eps", "rope_theta")


def check_config(config: dict, where: str, fix: str = "fix or re-download config.json",
                 required: tuple[str, ...] = CONFIG_INTS) -> None:
    """Each field the model is built from present and of the right type, named when not
    (``where``: the file or metadata the values came from; ``fix``: what to do about it)."""
    for key in required + OPTIONAL_INTS:
        if key not in config and key in OPTIONAL_INTS:
            continue
        require(key in config, f"{where} lacks '{key}'; {fix}")
        v = config[key]
        require(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0,
                f"{where}: '{key}' is {v!r}; it must be a positive integer: {fix}")
    for key in OPTIONAL_NUMBERS:
        v = config.get(key, 1.0)
        require(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                f"{where}: '{key}' is {v!r}; it must be a positive number: {fix}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    require(heads % kv == 0 and ("head_dim" in config or config["hidden_size"] % heads == 0),
            f"{where}: hidden_size {config['hidden_size']}, num_attention_heads {heads} and "
            f"num_key_value_heads {kv} do not divide evenly; {fix}")


def read_hf_dir(path: Path) -> tuple[dict, dict]:
    """``(config, weights)`` of a local HF directory, each problem one UserError line."""
    import mlx.core as mx

    require(path.is_dir(), f"{path} is not a directory; give a Hugging Face model directory or a .gguf file")
    cfg_file = path / "config.json"
    require(cfg_file.exists(), f"{path} has no config.json; give a Hugging Face model directory "
                               "(config.json + *.safetensors + tokenizer files)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); fix or re-download it") from None
    require(isinstance(config, dict), f"{cfg_file} holds a JSON {type(config).__name__}, not a JSON object; "
                                      "fix or re-download it")
    config = normalize_config(config)
    archs.check_config(config, str(cfg_file))   # the family (or one line naming the supported) and its keys
    check_config(config, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    require(bool(files), f"{path} has no *.safetensors weights; convert PyTorch .bin checkpoints to "
                         "safetensors first (or download the safetensors variant)")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX: RuntimeError/ValueError naming the header problem
            raise UserError(f"{f} is not a readable safetensors file ({e}); it may be truncated: "
                            "download it again") from None
    return config, weights


def convert_hf_dir(path: Path, cfg: ConvertConfig, source: str | None = None) -> ConvertReport:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config, weights = read_hf_dir(path)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):  # drops rotary inv_freq, a tied lm_head, ... (not every family has one)
        weights = model.sanitize(weights)
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    require(not missing, f"{path} lacks weights {', '.join(missing[:3])}; the checkpoint is incomplete")
    require(not extra, f"{path} has unexpected weights {', '.join(extra[:3])}; is config.json for this checkpoint?")

    dtype = cfg.resolved_dtype()
    report = ConvertReport(source=source or str(path), out_dir=cfg.out_dir, model_type=config["model_type"])
    stats, out, quant_of = QuantStats(), {}, {}
    for name, w in weights.items():
        module = name.rsplit(".", 1)[0]
        if cfg.quantize and name.endswith(".weight") and w.ndim == 2 and w.shape[1] % cfg.q_group_size == 0:
            q, s, b = quantize(w.astype(mx.float32), cfg.q_bits, cfg.q_group_size, stats)
            out.update({name: q, f"{module}.scales": s.astype(dtype), f"{module}.biases": b.astype(dtype)})
            quant_of[module] = cfg.q_bits
            report.requantized.append(module)
        else:
            out[name] = w.astype(dtype)
            report.floats.append(module)
    config.pop("quantization_config", None)
    if quant_of:
        config["quantization"] = {"group_size": cfg.q_group_size, "bits": cfg.q_bits, "mode": "affine"}
    config["torch_dtype"] = str(dtype).split(".")[-1]
    report.rel_rms_error = stats.rel_rms
    report.bits_per_weight = bits_per_weight(out, quant_of)
    with atomic_dir(cfg.out_dir, cfg.force) as tmp:
        write_model_dir(tmp, out, config)
        for fname in TOKENIZER_FILES:
            if (path / fname).exists():
                shutil.copy2(path / fname, tmp / fname)
        require((tmp / "tokenizer.json").exists() or (tmp / "tokenizer.model").exists(),
                f"{path} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files there")
        report.size_bytes = sum(f.stat().st_size for f in tmp.iterdir())
    return report
