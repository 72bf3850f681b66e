"""Several LoRA adapters over one base model, switched without reloading anything.

Each adapted linear is wrapped once in :class:`MultiLoRALinear`, which keeps the base layer
untouched and holds every adapter's ``(lora_a, lora_b, scale)`` that targets it. Switching
adapters only sets the ``active`` name on each wrapper (a Python loop over ~200 objects for
SmolLM2, well under a millisecond); the base weights are shared and never copied.

Adapters are read straight from the on-disk contract written by training:
``adapters.safetensors`` (``<module path>.lora_a`` (in, r), ``<module path>.lora_b`` (r, out))
and ``adapter_config.json`` (mlx-lm keys plus ``scale``, ``use_dora``, ``format_version``), so
``y = base(x) + scale * (x @ lora_a) @ lora_b``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError, require

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
BASE = "base"  # the name that means "no adapter" in chat (/adapter off) and serve (model=base)


@dataclass
class AdapterSpec:
    name: str
    path: Path


def parse_adapter_specs(specs: list[str] | tuple[str, ...]) -> list[AdapterSpec]:
    """``NAME=DIR`` (or just ``DIR``: the name is the directory's name) -> specs, names unique."""
    out: list[AdapterSpec] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        require(bool(_NAME_RE.match(name)) and name not in (BASE, "off"),
                f"bad adapter name {name!r} in --adapter {spec!r}: use NAME=DIR with NAME of letters, "
                f"digits, '_', '-', '.' (not 'base' or 'off')")
        require(all(s.name != name for s in out), f"adapter name {name!r} given twice in --adapter")
        out.append(AdapterSpec(name, Path(path).expanduser()))
    return out


@dataclass
class AdapterFiles:
    """One adapter as read from disk: per-module ``(lora_a, lora_b)`` and its scale."""
    name: str
    path: Path
    config: dict
    scale: float
    weights: dict[str, tuple[mx.array, mx.array]] = field(default_factory=dict)


def read_adapter(name: str, path: str | Path) -> AdapterFiles:
    """Read and validate an adapter directory; UserError names the file and the fix."""
    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapters.safetensors"
    require(path.is_dir(), f"adapter {name!r}: directory {str(path)!r} not found; pass --adapter NAME=DIR "
                           f"with the directory written by `mlx_qlora train`")
    require(cfg_file.is_file() and w_file.is_file(),
            f"adapter {name!r}: {str(path)!r} lacks adapter_config.json or adapters.safetensors; "
            f"pass the directory written by `mlx_qlora train`")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"adapter {name!r}: {cfg_file} is not valid JSON ({e})") from None
    require(config.get("fine_tune_type", "lora") == "lora" and not config.get("use_dora", False),
            f"adapter {name!r}: only LoRA adapters can be switched at run time (this one is "
            f"{'DoRA' if config.get('use_dora') else config.get('fine_tune_type')}); fuse it with "
            f"`mlx_qlora fuse` and load the fused model instead")
    lp = config.get("lora_parameters", {})
    scale = float(config.get("scale", lp.get("scale", 1.0)))
    tensors = mx.load(str(w_file))
    weights: dict[str, tuple[mx.array, mx.array]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_a"):
            continue
        module = key[: -len(".lora_a")]
        b = tensors.get(module + ".lora_b")
        require(b is not None, f"adapter {name!r}: {w_file} has {key} but no {module}.lora_b")
        require(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0],
                f"adapter {name!r}: {module} has lora_a {a.shape} and lora_b {b.shape}; expected "
                f"(in, r) and (r, out)")
        weights[module] = (a, b)
    require(bool(weights), f"adapter {name!r}: {w_file} holds no '*.lora_a' tensors")
    return AdapterFiles(name, path, config, scale, weights)


def _linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or QuantizedLinear."""
    out_f, w_in = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return w_in * 32 // layer.bits, out_f
    return w_in, out_f


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus any number of named LoRAs; ``active`` picks one (or None)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.loras: dict[str, dict[str, mx.array]] = {}   # name -> {"a", "b", "scale"}
        self.active: str | None = None                     # plain attribute, not a parameter

    def add(self, name: str, a: mx.array, b: mx.array, scale: float, dtype: mx.Dtype):
        # Fold the scale into lora_b once so the hot path is two matmuls and an add.
        self.loras[name] = {"a": a.astype(dtype), "b": (b * scale).astype(dtype)}

    def __call__(self, x):
        y = self.base(x)
        lora = self.loras.get(self.active) if self.active is not None else None
        if lora is None:
            return y
        return y + (x @ lora["a"]) @ lora["b"]


def _resolve(model: nn.Module, path: str):
    """Walk a dotted mlx-lm module path -> (parent, key, module); key is str or int."""
    parent, key, obj = None, None, model
    for part in path.split("."):
        parent = obj
        key = int(part) if part.isdigit() else part
        try:
            obj = obj[key] if isinstance(key, int) else getattr(obj, key)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None, None, None
    return parent, key, obj


def _dtype_of(layer: nn.Module) -> mx.Dtype:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.dtype
    return layer.weight.dtype


class AdapterSet:
    """The adapters loaded over one model; ``activate(name)`` switches all wrappers at once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.wrappers: dict[str, MultiLoRALinear] = {}
        self.names: list[str] = []
        self.files: dict[str, AdapterFiles] = {}
        self.active: str | None = None

    def add(self, name: str, path: str | Path) -> AdapterFiles:
        require(name not in self.names, f"adapter {name!r} is already loaded")
        files = read_adapter(name, path)
        # validate every module before touching the model, so a bad adapter leaves no trace
        for module, (a, b) in files.weights.items():
            layer = self._base_layer(name, module)
            in_f, out_f = _linear_dims(layer)
            require(a.shape[0] == in_f and b.shape[1] == out_f,
                    f"adapter {name!r}: {module} has lora_a {a.shape}, lora_b {b.shape} but the model's "
                    f"layer is {in_f} -> {out_f}; was it trained on a different base model?")
        for module, (a, b) in files.weights.items():
            wrapper = self._wrap(module)
            wrapper.add(name, a, b, files.scale, _dtype_of(wrapper.base))
        mx.eval([w.loras[name] for w in self.wrappers.values() if name in w.loras])
        self.names.append(name)
        self.files[name] = files
        return files

    def _base_layer(self, name: str, module: str) -> nn.Module:
        if module in self.wrappers:
            return self.wrappers[module].base
        _, _, layer = _resolve(self.model, module)
        require(layer is not None, f"adapter {name!r}: the model has no module {module!r}; was it trained "
                                   f"on a different base model?")
        require(isinstance(layer, (nn.Linear, nn.QuantizedLinear)),
                f"adapter {name!r}: {module!r} is a {type(layer).__name__}, not a linear layer")
        return layer

    def _wrap(self, module: str) -> MultiLoRALinear:
        if module in self.wrappers:
            return self.wrappers[module]
        parent, key, layer = _resolve(self.model, module)
        wrapper = MultiLoRALinear(layer)
        if isinstance(key, int):
            parent[key] = wrapper
        else:
            setattr(parent, key, wrapper)
        self.wrappers[module] = wrapper
        return wrapper

    def activate(self, name: str | None) -> float:
        """Make ``name`` (None or 'base' = no adapter) active everywhere; returns seconds taken."""
        t0 = time.perf_counter()
        if name == BASE:
            name = None
        require(name is None or name in self.names,
                f"unknown adapter {name!r}; loaded: {', '.join(self.names) or 'none'} "
                f"(load one with --adapter NAME=DIR)")
        for w in self.wrappers.values():
            w.active = name
        self.active = name
        return time.perf_counter() - t0
