"""SmolLM3: llama blocks where every 4th layer has no rope (``no_rope_layers``).

llama.cpp's smollm3 architecture hard-codes the interval (4) and uses llama's interleaved rope,
so its converter permutes Q/K rows like llama's; another pattern is refused at export.
"""
from __future__ import annotations

from . import Arch
from .llama import export_check as rope_check, from_gguf as rope_from_gguf, write_meta

INTERVAL = 4  # llama.cpp: n_no_rope_layer_step


def _pattern(n: int, interval: int = INTERVAL) -> list[int]:
    return [int((i + 1) % interval != 0) for i in range(n)]


def export_check(cfg: dict):
    layers = cfg.get("no_rope_layers") or _pattern(cfg["num_hidden_layers"], cfg.get("no_rope_layer_interval", INTERVAL))
    if list(layers) != _pattern(cfg["num_hidden_layers"]):
        return "no_rope_layers is not 'every 4th layer without rope', the pattern llama.cpp hard-codes"
    return rope_check(cfg)


def from_gguf(meta: dict, arch: str, cfg: dict, tensors: set) -> None:
    cfg["no_rope_layer_interval"] = INTERVAL
    cfg["no_rope_layers"] = _pattern(cfg["num_hidden_layers"])
    rope_from_gguf(meta, arch, cfg, tensors)


ARCHS = [Arch("smollm3", ("smollm3",), "smollm3", permute_qk=True, export_check=export_check,
              write_meta=write_meta, from_gguf=from_gguf)]
