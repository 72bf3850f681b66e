"""LoRA adapter <-> Hugging Face PEFT (``adapter_model.safetensors`` + ``adapter_config.json``).

PEFT stores, for the linear at HF module path P, ``base_model.model.P.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r): the transposes of our (in, r) / (r, out) factors, with
``y = W x + (lora_alpha / r) * B A x`` (``/ sqrt(r)`` with use_rslora). mlx-lm uses the HF module
paths, so names map one to one. Export writes ``lora_alpha = scale * r`` with use_rslora off,
which gives exactly our scale whatever scaling rule training used. Nothing here needs torch.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir
from ..errors import UserError, require
from . import ExportConfig, ExportReport

PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _targets_and_layers(modules) -> tuple[list[str], list[int]]:
    targets, layers = set(), set()
    for m in modules:
        hit = _LAYER.match(m)
        require(hit is not None, f"adapter module {m} is outside the transformer blocks; PEFT export "
                                 "supports adapters on model.layers.N.* linears")
        layers.add(int(hit.group(1)))
        targets.add(hit.group(2))
    return sorted(targets), sorted(layers)


def export_peft(cfg: ExportConfig) -> ExportReport:
    from safetensors.numpy import save_file

    from ..model.model_io import read_config
    from ..train.adapter_files import read_adapter

    adapter = read_adapter(cfg.adapter)
    config = read_config(cfg.model)
    targets, layers = _targets_and_layers(adapter.pairs)
    tensors = {}
    for module, (a, b) in sorted(adapter.pairs.items()):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.array(a).T)  # (r, in)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.array(b).T)  # (out, r)
    # PEFT matches target_modules by name suffix in every block; layers_to_transform narrows it
    # to the blocks that really have weights (otherwise PEFT adds zero-init LoRA and warns).
    all_layers = list(range(int(config["num_hidden_layers"])))
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": float(adapter.config.get("dropout", adapter.config.get("lora_parameters", {}).get("dropout", 0.0))),
        "target_modules": [t.split(".")[-1] for t in targets], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None if layers == all_layers else layers,
        "layers_pattern": None if layers == all_layers else "layers",
        "base_model_name_or_path": str(adapter.config.get("base_model") or cfg.model),
    }
    report = ExportReport(out=cfg.out, kind="PEFT adapter")
    require(len({t.split(".")[-1] for t in targets}) == len(targets),
            f"adapter targets {targets} share a last name; PEFT's target_modules cannot tell them apart")
    with atomic_dir(cfg.out, cfg.force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(peft_cfg, indent=2) + "\n")
        report.size_bytes = sum(f.stat().st_size for f in tmp.iterdir())
    for name, t in tensors.items():
        report.add(name.removeprefix(PREFIX), "F32", "float")
    report.notes.append(f"r {adapter.rank}, lora_alpha {adapter.alpha:g} (scale {adapter.scale:g}); load with "
                        f"peft.PeftModel.from_pretrained(model, '{cfg.out}')")
    return report


def run_import_peft(peft_dir: str, out_dir: str, force: bool = False) -> Path:
    """PEFT LoRA directory -> mlx_qlora adapter directory (training's format, format_version 1)."""
    from safetensors.numpy import load_file, save_file

    src = Path(peft_dir)
    require(src.is_dir(), f"{src} is not a directory; give a PEFT LoRA adapter directory")
    require((src / WEIGHTS).exists() and (src / CONFIG).exists(),
            f"{src} lacks {WEIGHTS} or {CONFIG}; give a PEFT LoRA adapter directory "
            "(.bin adapters: re-save them with safe_serialization=True)")
    try:
        pc = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{src / CONFIG} is not valid JSON ({e}); fix or re-save the adapter") from None
    require(isinstance(pc, dict), f"{src / CONFIG} is not a JSON object; fix or re-save the adapter")
    require(pc.get("peft_type", "LORA") == "LORA", f"{src} is a {pc.get('peft_type')} adapter; only LoRA imports")
    require(not pc.get("use_dora"), f"{src} is a DoRA adapter; only plain LoRA imports")
    require(not pc.get("fan_in_fan_out"), f"{src} uses fan_in_fan_out (GPT-2 Conv1D layout); not supported")
    require(not pc.get("rank_pattern") and not pc.get("alpha_pattern"),
            f"{src} sets per-module rank_pattern/alpha_pattern; only one rank and alpha are supported")
    for key in ("r", "lora_alpha"):
        v = pc.get(key)
        require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                f"{src / CONFIG}: " + (f"lacks '{key}'" if v is None else f"'{key}' is {v!r}")
                + f"; a LoRA adapter config needs a positive '{key}'")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    scale = alpha / math.sqrt(r) if pc.get("use_rslora") else alpha / r
    try:
        raw = load_file(str(src / WEIGHTS))
    except Exception as e:  # safetensors raises SafetensorError on a bad header or short file
        raise UserError(f"{src / WEIGHTS} is not a readable safetensors file ({e}); re-save the adapter") from None
    tensors = {}
    for key, a in raw.items():
        if not key.endswith(".lora_A.weight"):
            require(key.endswith(".lora_B.weight"), f"{src / WEIGHTS} has {key}, which is not a LoRA "
                                                    "factor (modules_to_save / biases are not supported)")
            continue
        module = re.sub(r"^(base_model\.model\.)", "", key[: -len(".lora_A.weight")])
        b = raw.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        require(b is not None, f"{src / WEIGHTS} has {key} without its lora_B; the file is damaged")
        tensors[f"{module}.lora_a"] = np.ascontiguousarray(a.T.astype(np.float32))  # (in, r)
        tensors[f"{module}.lora_b"] = np.ascontiguousarray(b.T.astype(np.float32))  # (r, out)
    require(bool(tensors), f"{src / WEIGHTS} holds no lora_A/lora_B tensors")
    targets, layers = _targets_and_layers(k[: -len(".lora_a")] for k in tensors if k.endswith(".lora_a"))
    config = {  # num_layers (mlx-lm: the last N blocks) assumes the adapter reaches the last block
        "fine_tune_type": "lora", "num_layers": max(layers) + 1 - min(layers),
        "lora_parameters": {"rank": r, "scale": scale, "dropout": float(pc.get("lora_dropout", 0.0)), "keys": targets},
        "base_model": pc.get("base_model_name_or_path") or "", "rank": r, "alpha": alpha, "scale": scale,
        "dropout": float(pc.get("lora_dropout", 0.0)), "use_rslora": bool(pc.get("use_rslora")), "use_dora": False,
        "target_modules": targets, "layers": layers, "format_version": 1, "imported_from": "peft",
    }
    with atomic_dir(out_dir, force) as tmp:
        save_file(tensors, str(tmp / "adapters.safetensors"), metadata={"format": "mlx"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"imported PEFT adapter {src} -> {out_dir}: {len(tensors) // 2} modules, rank {r}, scale {scale:g}")
    return Path(out_dir)

