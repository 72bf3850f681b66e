"""Several LoRA adapters over one base model, switched without reloading anything.

Each adapted linear is wrapped once in :class:`MultiLoRALinear`, which keeps the base layer
untouched and holds every adapter's ``(lora_a, lora_b, scale)`` that targets it. Switching
adapters only sets the ``active`` name on each wrapper (a Python loop over ~200 objects for
SmolLM2, well under a millisecond); the base weights are shared and never copied.

Adapters are read by ``adapter_files.read_adapter`` (the directory training writes), so
``y = base(x) + scale * (x @ lora_a) @ lora_b``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import require
from ..train.adapter_files import Adapter, read_adapter
from ..train.lora import linear_dims

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
        self.files: dict[str, Adapter] = {}
        self.active: str | None = None

    def add(self, name: str, path: str | Path) -> Adapter:
        require(name not in self.names, f"adapter {name!r} is already loaded")
        files = read_adapter(path, name)
        # validate every module before touching the model, so a bad adapter leaves no trace
        for module, (a, b) in files.pairs.items():
            layer = self._base_layer(name, module)
            in_f, out_f = linear_dims(layer)
            require(a.shape[0] == in_f and b.shape[1] == out_f,
                    f"adapter {name!r}: {module} has lora_a {a.shape}, lora_b {b.shape} but the model's "
                    f"layer is {in_f} -> {out_f}; was it trained on a different base model?")
        for module, (a, b) in files.pairs.items():
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
