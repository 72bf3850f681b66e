"""LoRA / DoRA layers on frozen (quantized or dense) linears, and the adapter directory format.

``y = x @ W.T + scale * (dropout(x) @ lora_a) @ lora_b`` with ``lora_a`` (in, r), ``lora_b``
(r, out) zero-initialised, exactly mlx-lm's LoRALinear layout, so a fresh adapter leaves the model
unchanged and fusing is ``W + scale * (lora_a @ lora_b).T``. DoRA adds a per-output magnitude
``m`` (out,), as mlx-lm's DoRALinear. The frozen base product uses ``mlx_cpu_kernels.base_linear``
(dequantize + BLAS on CPU, ``quantized_matmul`` on Metal/CUDA).

Adapter directory: ``adapters.safetensors`` (``<module path>.lora_a`` / ``.lora_b`` [/ ``.m``]) and
``adapter_config.json`` holding mlx-lm's keys (so ``mlx_lm.load(..., adapter_path=)`` works) plus
ours: base_model, rank, alpha, scale, use_rslora, use_dora, target_modules, layers, format_version.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import atomic_file
from ..errors import UserError, require
from .config import LoraConfig, parse_layers
from .engines.mlx_cpu_kernels import base_linear, dense_weight

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
HALF_TYPES = (mx.float16, mx.bfloat16)
_DROPOUT_KEYS: list = []   # innermost last: the key LoRA dropout draws from (see dropout_key)


def seed_dropout(seed: tuple[int, int, int]) -> None:
    """Seed MLX's generator from (run seed, step, micro-batch x ranks + rank): LoRA dropout masks
    are a function of the step, so a resumed run draws what an uninterrupted one did."""
    mx.random.seed(seed[0] * 1_000_003 + seed[1] * 1_009 + seed[2])


@contextmanager
def dropout_key(key: mx.array):
    """LoRA dropout inside this block draws its masks from ``key`` (split once per use) instead of
    the global random state: a checkpointed block recomputed in backward gets the same masks."""
    _DROPOUT_KEYS.append(key)
    try:
        yield
    finally:
        _DROPOUT_KEYS.pop()


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or QuantizedLinear (packed weights: 32 // bits per uint32);
    an (Quantized)Embedding used as output head maps dim -> vocab."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update (and DoRA magnitude when ``dora``)."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.linear.freeze()
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)  # mlx-lm's init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        if dora:
            self.m = mx.linalg.norm(dense_weight(linear), axis=1)

    @property
    def is_dora(self) -> bool:
        return "m" in self

    def _dropout(self, x):
        keep = self.dropout._p_1
        if not _DROPOUT_KEYS or keep == 1 or not self.training:
            return self.dropout(x)
        _DROPOUT_KEYS[-1], sub = mx.random.split(_DROPOUT_KEYS[-1])
        return (mx.random.bernoulli(keep, x.shape, key=sub) * x) * (1 / keep)   # as nn.Dropout

    def __call__(self, x):
        if self.is_dora:
            return self._dora(x)
        y = base_linear(self.linear, x)
        # scale folded into the (rank, out) factor: one (tokens, out) elementwise pass fewer
        a, b = self.lora_a, self.scale * self.lora_b
        if x.dtype in HALF_TYPES:
            # a half-precision base: the LoRA matmuls run in its dtype (fp32 factors and their
            # gradients stay fp32), instead of promoting the (tokens, in) activations to fp32
            a, b = a.astype(x.dtype), b.astype(x.dtype)
        z = (self._dropout(x) @ a) @ b
        return y + (z if z.dtype == x.dtype else z.astype(x.dtype))

    def _dora(self, x):
        # As mlx-lm's DoRALinear: rescale rows of (W + scale B^T A^T) to norm m; the norm is
        # treated as a constant in backward (stop_gradient), per the DoRA paper.
        lin = self.linear
        y = base_linear(lin, x)
        if "bias" in lin:
            y = y - lin["bias"]
        z = (self._dropout(x) @ self.lora_a) @ self.lora_b
        out = y + (self.scale * z).astype(x.dtype)
        w = dense_weight(lin)
        adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
        denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        out = (self.m / denom).astype(x.dtype) * out
        if "bias" in lin:
            out = out + lin["bias"]
        return out


def _layers(model: nn.Module) -> list:
    require(hasattr(model, "layers"), f"{type(model).__name__} has no .layers; LoRA needs an mlx-lm decoder model")
    return list(model.layers)


def _layer_prefix(model: nn.Module, layer) -> str:
    """Module path of a transformer block, e.g. 'model.layers.3'."""
    for name, mod in model.named_modules():
        if mod is layer:
            return name
    raise UserError("could not locate a transformer layer in the model tree")


def linear_names(layer: nn.Module) -> list[str]:
    """Names (relative to the block) of all linear modules in a transformer block."""
    return sorted(name for name, m in layer.named_modules() if isinstance(m, LINEAR_TYPES) and name)


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Block-relative module names to adapt: "all-linear" or names matched by suffix."""
    available = linear_names(_layers(model)[0])
    if targets == "all-linear":
        return available
    chosen = []
    for t in targets:
        hits = [n for n in available if n == t or n.endswith("." + t)]
        require(hits, f"lora.targets: no linear named {t!r} in the layers; available: {', '.join(available)}")
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze ``model`` and wrap the selected linears in LoRALinear (in place; returns model)."""
    layers = _layers(model)
    indices = parse_layers(cfg.layers, len(layers))
    targets = resolve_targets(model, cfg.targets)
    model.freeze()
    for i in indices:
        layer = layers[i]
        mods = dict(layer.named_modules())
        new = [(name, LoRALinear(mods[name], cfg.rank, cfg.scale, cfg.dropout, cfg.use_dora))
               for name in targets if isinstance(mods.get(name), LINEAR_TYPES)]
        layer.update_modules(tree_unflatten(new))
    object.__setattr__(model, "_lora_info", {"targets": targets, "layers": indices, "cfg": cfg})
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their logical size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        for k, v in m.items():
            if not isinstance(v, mx.array):
                continue
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                if k == "weight":
                    total += v.size * 32 // m.bits
            else:
                total += v.size
    return trainable, total


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.trainable_parameters())}


def adapter_config(model: nn.Module, base_model: str) -> dict:
    info = getattr(model, "_lora_info", None)
    require(info is not None, "the model has no LoRA layers: call apply_lora first")
    cfg: LoraConfig = info["cfg"]
    n_layers = len(_layers(model))
    return {
        # mlx-lm's keys: its loader adapts the last num_layers blocks; blocks we did not adapt get
        # a zero lora_b there, which leaves them exact.
        "fine_tune_type": "dora" if cfg.use_dora else "lora",
        "num_layers": n_layers - min(info["layers"]),
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": info["targets"]},
        "base_model": str(base_model),
        "rank": cfg.rank, "alpha": cfg.alpha, "scale": cfg.scale,
        "dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
        "target_modules": info["targets"], "layers": info["layers"],
        "format_version": FORMAT_VERSION,
    }


def save_weights(weights: dict[str, mx.array], path: Path) -> None:
    """safetensors written to a temp name then renamed, so a crash never leaves half a file."""
    with atomic_file(path, force=True) as tmp:
        mx.save_safetensors(str(tmp), weights)


def save_adapter(model: nn.Module, out_dir, cfg: LoraConfig | None = None, base_model: str = "") -> Path:
    """Write adapters.safetensors and adapter_config.json into ``out_dir`` (atomically each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        model._lora_info["cfg"] = cfg
    save_weights(adapter_weights(model), out / ADAPTER_FILE)
    with atomic_file(out / CONFIG_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir) -> dict:
    """The adapter_config.json of ``adapter_dir`` (UserError naming the fix when absent or bad)."""
    d = Path(adapter_dir)
    p = d / CONFIG_FILE
    require(p.is_file(), f"{d} is not an adapter directory (no {CONFIG_FILE}); give the --out directory of `mlx_qlora train`")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} line {e.lineno}: not valid JSON ({e.msg})") from None
    if "rank" not in cfg:  # an mlx-lm adapter: derive our keys from its own
        lp = cfg.get("lora_parameters", {})
        cfg.update(rank=lp.get("rank", 8), scale=lp.get("scale", 20.0), alpha=lp.get("scale", 20.0) * lp.get("rank", 8),
                   dropout=lp.get("dropout", 0.0), use_rslora=False, use_dora=cfg.get("fine_tune_type") == "dora",
                   target_modules=lp.get("keys") or "all-linear", layers=cfg.get("num_layers", 16))
    return cfg


def lora_config_from(adapter_cfg: dict) -> LoraConfig:
    layers = adapter_cfg["layers"]
    return LoraConfig(rank=adapter_cfg["rank"], alpha=float(adapter_cfg["alpha"]), dropout=float(adapter_cfg.get("dropout", 0.0)),
                      targets=adapter_cfg["target_modules"], layers=layers,
                      use_rslora=bool(adapter_cfg.get("use_rslora", False)), use_dora=bool(adapter_cfg.get("use_dora", False)))


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Apply the LoRA layers described by ``adapter_dir`` to ``model`` and load their weights."""
    cfg = read_adapter_config(adapter_dir)
    lcfg = lora_config_from(cfg)
    apply_lora(model, lcfg)
    if not math.isclose(lcfg.scale, float(cfg.get("scale", lcfg.scale)), rel_tol=1e-6):
        for _, m in model.named_modules():  # an mlx-lm adapter whose scale is not alpha/rank
            if isinstance(m, LoRALinear):
                m.scale = float(cfg["scale"])
    path = Path(adapter_dir) / ADAPTER_FILE
    require(path.is_file(), f"{adapter_dir}: {ADAPTER_FILE} is missing; the training run did not finish a save")
    weights = mx.load(str(path))
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    require(not missing and not extra, f"{path}: tensors do not match adapter_config.json "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was the adapter trained on another model?")
    for k, w in weights.items():
        require(w.shape == expected[k].shape, f"{path}: {k} has shape {tuple(w.shape)}, the model needs "
                f"{tuple(expected[k].shape)}; was the adapter trained on another model?")
    model.load_weights(list(weights.items()), strict=False)
    return model
