"""Read an adapter directory (the format training writes) for fuse, export and inference.

Layout (format_version 1): ``adapters.safetensors`` holds, for each adapted linear at mlx-lm
module path P, ``P.lora_a`` (in, r) and ``P.lora_b`` (r, out), so that
``y = x @ W.T + scale * (x @ lora_a) @ lora_b``; ``adapter_config.json`` carries ``scale`` (and
rank, alpha, targets, layers, base model) next to mlx-lm's own keys. Training itself reads and
writes it through ``lora.py``; everything downstream reads it here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, require

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Adapter:
    name: str
    path: Path
    pairs: dict          # module path -> (lora_a (in, r), lora_b (r, out)) as float32 mx.arrays
    scale: float         # multiplies (x @ A) @ B
    rank: int            # of the first module (export checks that all agree where it matters)
    config: dict
    fingerprint: str     # sha256 of adapters.safetensors, hex

    @property
    def alpha(self) -> float:
        """The alpha with alpha / rank == scale (what llama.cpp and PEFT without rsLoRA use)."""
        return self.scale * self.rank


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read and validate an adapter directory; each problem is one UserError naming the fix."""
    import mlx.core as mx

    p = Path(path).expanduser()
    who = f"adapter {name!r} ({p})" if name else f"adapter {p}"
    require(p.exists(), f"{who} not found; give the directory `mlx_qlora train` wrote "
                        f"({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    require(p.is_dir(), f"{who} is not a directory; give the directory `mlx_qlora train` wrote")
    wfile, cfile = p / ADAPTER_WEIGHTS, p / ADAPTER_CONFIG
    missing = [f.name for f in (cfile, wfile) if not f.is_file()]
    require(not missing, f"{who} lacks {' and '.join(missing)}; is it an adapter directory from mlx_qlora train?")
    try:
        config = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfile} is not valid JSON ({e}); fix or re-create the adapter") from None
    require(isinstance(config, dict), f"{cfile} holds a JSON {type(config).__name__}, not a JSON object; "
                                      "fix or re-create the adapter")
    require(config.get("fine_tune_type", "lora") == "lora" and not config.get("use_dora"),
            f"{who} is {'DoRA' if config.get('use_dora') else config.get('fine_tune_type')}; fuse, export and "
            "adapter switching support plain LoRA: train with lora.use_dora: false")
    try:
        raw = mx.load(str(wfile))
    except Exception as e:  # MLX raises RuntimeError/ValueError on a bad header or short file
        raise UserError(f"{wfile} is not a readable safetensors file ({e}); the adapter is damaged: "
                        "re-train or re-export it") from None
    require(isinstance(raw, dict), f"{wfile} is not a safetensors file; the adapter is damaged")
    pairs = {}
    for key, a in raw.items():
        if not key.endswith(".lora_a"):
            continue
        module = key[: -len(".lora_a")]
        b = raw.get(f"{module}.lora_b")
        require(b is not None, f"{wfile} has {key} without {module}.lora_b; the file is damaged")
        require(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0],
                f"{who}: {module} has lora_a {a.shape} and lora_b {b.shape}; expected (in, r) and (r, out)")
        pairs[module] = (a.astype(mx.float32), b.astype(mx.float32))
    require(bool(pairs), f"{wfile} holds no '*.lora_a'/'*.lora_b' tensors; is it a LoRA adapter?")
    scale = config.get("scale", config.get("lora_parameters", {}).get("scale"))
    require(scale is not None, f"{cfile} gives no 'scale'; add the LoRA scale (alpha / rank) to it")
    rank = int(next(iter(pairs.values()))[0].shape[1])
    digest = hashlib.sha256(wfile.read_bytes()).hexdigest()
    return Adapter(name or p.name, p, pairs, float(scale), rank, config, digest)
