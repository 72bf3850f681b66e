"""Typed training configuration: defaults < YAML recipe < command-line flags.

Every section is a dataclass that validates itself in ``__post_init__`` and names the fix when a
value is wrong (``UserError``). The YAML mirrors the nesting (``lora: {rank: 16}``); flags use
the dotted path (``--lora.rank 16``) or, when unambiguous, the bare field name (``--rank 16``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, require
from .preference_config import PreferenceConfig, check_method

SCHEDULES = ("cosine", "linear", "constant")
FORMATS = ("auto", "text", "completions", "chat")
BASE_MATMULS = ("auto", "quantized", "dense")   # train/engines/dequant_gemm.py (kept here: no MLX import)
CPU_GEMMS = ("auto", "fp32", "bf16")            # train/engines/cpu_gemm.py (kept here: no NumPy import)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0                 # scale = alpha / rank (alpha / sqrt(rank) with rsLoRA)
    dropout: float = 0.0                # on the LoRA branch input only
    targets: Any = "all-linear"         # "all-linear" or names like ["q_proj", "self_attn.v_proj"]
    layers: Any = "all"                 # "all", N or "last N", "0-3,8", or a list of indices
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        require(_is_int(self.rank) and self.rank >= 1, f"lora.rank={self.rank!r}: use a positive integer such as 8 or 16")
        require(_is_num(self.alpha) and self.alpha > 0, f"lora.alpha={self.alpha!r}: use a positive number such as 16 (commonly 2 x rank)")
        require(_is_num(self.dropout) and 0 <= self.dropout < 1, f"lora.dropout={self.dropout!r}: use a value in [0, 1), e.g. 0.05")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        require(self.targets == "all-linear" or (isinstance(self.targets, list) and self.targets
                                                  and all(isinstance(t, str) for t in self.targets)),
                f"lora.targets={self.targets!r}: use 'all-linear' or a list of module names like [q_proj, v_proj]")
        require(isinstance(self.use_rslora, bool) and isinstance(self.use_dora, bool),
                "lora.use_rslora / lora.use_dora: use true or false")
        parse_layers(self.layers, None)  # syntax check now; bounds are checked against the model

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_layers(spec, n_layers: int | None) -> list[int] | None:
    """Layer indices from "all", N / "last N", "0-3,8" or a list; None when n_layers is unknown."""
    bad = (f"lora.layers={spec!r}: use 'all', a count of last layers (16 or 'last 16'), ranges "
           f"like '0-3,8-11', or a list of indices")
    if isinstance(spec, bool):
        raise UserError(bad)
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return None if n_layers is None else list(range(n_layers))
        if s.startswith("last"):
            s = s[4:].strip()
            require(s.isdigit(), bad)
            spec = int(s)
        elif s.isdigit():
            spec = int(s)
        else:
            idx = []
            for part in s.split(","):
                a, _, b = part.strip().partition("-")
                require(a.isdigit() and (not b or b.isdigit()), bad)
                idx.extend(range(int(a), int(b or a) + 1))
            spec = idx
    if _is_int(spec):
        require(spec >= 1, bad)
        if n_layers is None:
            return None
        require(spec <= n_layers, f"lora.layers={spec}: the model has only {n_layers} layers; use at most {n_layers}")
        return list(range(n_layers - spec, n_layers))
    require(isinstance(spec, list) and spec and all(_is_int(i) for i in spec), bad)
    if n_layers is None:
        return None
    bad_idx = [i for i in spec if not 0 <= i < n_layers]
    require(not bad_idx, f"lora.layers: indices {bad_idx} are out of range; the model has layers 0-{n_layers - 1}")
    return sorted(set(spec))


@dataclass
class DataConfig:
    train: str = ""                  # JSONL file, or a directory holding train.jsonl [valid.jsonl]
    valid: str | None = None         # JSONL file; when absent, valid_fraction of train is held out
    format: str = "auto"             # auto | text | completions | chat (auto: from the first row)
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    mask_prompt: bool = True         # completions/chat: loss only on completions / assistant turns
    max_seq_len: int = 2048          # tokens; longer rows are truncated (with a warning)
    valid_fraction: float = 0.05     # share of train rows held out when no valid file is given

    def __post_init__(self):
        require(isinstance(self.train, str), f"data.train={self.train!r}: give a JSONL file or a directory with train.jsonl")
        require(self.format in FORMATS, f"data.format={self.format!r}: use one of {', '.join(FORMATS)}")
        require(_is_int(self.max_seq_len) and self.max_seq_len >= 8, f"data.max_seq_len={self.max_seq_len!r}: use an integer >= 8, e.g. 2048")
        require(_is_num(self.valid_fraction) and 0 < self.valid_fraction < 1,
                f"data.valid_fraction={self.valid_fraction!r}: use a fraction in (0, 1), e.g. 0.05")
        require(isinstance(self.mask_prompt, bool), "data.mask_prompt: use true or false")


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    schedule: str = "cosine"         # cosine | linear | constant, after warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0        # final learning rate as a fraction of learning_rate
    weight_decay: float = 0.0        # AdamW decoupled weight decay
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1              # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # global L2 clip; null disables

    def __post_init__(self):
        require(_is_num(self.learning_rate) and 0 < self.learning_rate < 1,
                f"optim.learning_rate={self.learning_rate!r}: use a small positive number such as 1e-4")
        require(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps!r}: use an integer >= 0")
        require(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio!r}: use a value in [0, 1]")
        require(_is_num(self.weight_decay) and self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay!r}: use a value >= 0, e.g. 0.01")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            require(_is_num(v) and 0 <= v < 1, f"optim.{name}={v!r}: use a value in [0, 1), e.g. 0.9")
        require(_is_int(self.grad_accum) and self.grad_accum >= 1, f"optim.grad_accum={self.grad_accum!r}: use an integer >= 1")
        require(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
                f"optim.max_grad_norm={self.max_grad_norm!r}: use a positive number such as 1.0, or null to disable")


@dataclass
class TrainConfig:
    model: str = ""                  # MLX model directory (e.g. from `mlx_qlora convert`) or HF id
    out_dir: str = "adapters"        # adapter, checkpoints, metrics.jsonl, loss_curve.png
    steps: int = 100                 # optimizer steps
    batch_size: int = 4              # rows per micro-batch
    seed: int = 0
    grad_checkpoint: bool = False    # recompute each layer in backward: less memory, ~30% slower
    cpu_engine: bool = True          # CPU: NumPy/BLAS engine (train/engines/numpy_engine.py); false: MLX autodiff
    base_matmul: str = "auto"        # GPU: frozen 4-bit products as "dense" (dequantize + GEMM, see
                                     # train/engines/dequant_gemm.py) or "quantized" kernels; auto: dense on CUDA
    cpu_weight_cache_mb: int = 1024  # CPU engine: MiB of fp32 (bf16 with cpu_gemm bf16) copies of frozen weights
                                     # kept between steps (0: dequantize 4-bit weights at every use, least memory)
    cpu_gemm: str = "auto"           # CPU engine's frozen-weight products: "fp32" BLAS, or "bf16" operands with
                                     # fp32 accumulation (oneMKL); auto: bf16 where the CPU has amx_bf16/avx512_bf16
    checkpoint_every: int = 100      # steps between checkpoints (0: only at the end)
    eval_every: int = 50             # steps between validation losses (0: only at start and end)
    eval_batches: int = 25           # validation batches per evaluation (0: the whole set)
    keep_checkpoints: int = 2
    resume: bool = False             # continue from out_dir's latest checkpoint
    progress: bool = True            # live progress bar
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: str = "sft"              # sft | dpo | orpo (preference pairs: train/preference.py)
    init_adapter: str | None = None  # start from this adapter (e.g. the SFT one) instead of a fresh one;
                                     # DPO's reference model is the base with this adapter
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    task: dict | None = None         # generation metric for `mlx_qlora eval -c` (training ignores it),
                                     # e.g. {type: exact-match, answer_prefix: "A:", max_rows: 200}

    def __post_init__(self):
        require(self.task is None or isinstance(self.task, dict),
                f"task={self.task!r}: expected a mapping such as {{type: exact-match, answer_prefix: 'A:'}}")
        for name, cls in SECTIONS.items():
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, _build(cls, v, name + "."))
        check_method(self.method, self.init_adapter, self.preference)
        require(isinstance(self.model, str) and self.model, "model is empty: give an MLX model directory (see `mlx_qlora convert`)")
        require(self.data.train, "data.train is empty: give a JSONL file or a directory with train.jsonl (--data PATH)")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 1, f"{name}={v!r}: use a positive integer")
        for name in ("checkpoint_every", "eval_every", "eval_batches", "seed", "cpu_weight_cache_mb"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 0, f"{name}={v!r}: use an integer >= 0")
        require(_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints: use an integer >= 1")
        require(self.base_matmul in BASE_MATMULS,
                f"base_matmul={self.base_matmul!r}: use one of {', '.join(BASE_MATMULS)}")
        require(self.cpu_gemm in CPU_GEMMS, f"cpu_gemm={self.cpu_gemm!r}: use one of {', '.join(CPU_GEMMS)}")
        require(self.optim.warmup_steps < self.steps or self.steps == 1,
                f"optim.warmup_steps={self.optim.warmup_steps} is not below steps={self.steps}: lower it or train longer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "lora": LoraConfig, "optim": OptimConfig, "preference": PreferenceConfig}
# Short flags people type: --data PATH, --out DIR, --lr 2e-4, --iters 100.
ALIASES = {"data": "data.train", "out": "out_dir", "lr": "optim.learning_rate", "iters": "steps"}


def _build(cls, values: dict, prefix: str = ""):
    require(isinstance(values, dict), f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys: {', '.join(names)}"
            raise UserError(f"unknown setting {prefix}{k}{hint}")
    return cls(**values)


def _field_types() -> dict[str, str]:
    """Dotted path -> annotation string for every setting."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                out[f"{f.name}.{g.name}"] = str(g.type)
        else:
            out[f.name] = str(f.type)
    return out


def _coerce(text: str, ann: str, key: str):
    low = text.strip().lower()
    if "None" in ann and low in ("null", "none", "~"):
        return None
    try:
        if ann == "bool":
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if ann == "int":
            return int(text)
        if ann.startswith("float"):
            return float(text)
        if ann.startswith("str"):
            return text
    except ValueError:
        raise UserError(f"--{key} {text!r}: expected {ann.replace(' | None', '')}") from None
    value = yaml.safe_load(text)   # Any: lists, ints, strings ("last 16", [0, 1])
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lora.rank", "16", "--grad-checkpoint", "--steps=10"]`` -> {"lora.rank": 16, ...}."""
    types = _field_types()
    leaf = {}
    for path in types:
        leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        require(arg.startswith("--") and len(arg) > 2, f"unexpected argument {arg!r}: settings are given as --name value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        name = ALIASES.get(name, name)
        negate = False
        if name not in types and name not in leaf and name.startswith("no_"):
            name, negate = name[3:], True
        if name not in types:
            paths = leaf.get(name, [])
            if len(paths) != 1:
                if paths:
                    raise UserError(f"--{name} is ambiguous: use one of {', '.join('--' + p for p in paths)}")
                near = difflib.get_close_matches(name, list(types) + list(leaf), n=1)
                raise UserError(f"unknown option --{name}" + (f"; did you mean --{near[0]}?" if near else ""))
            name = paths[0]
        ann = types[name]
        if ann == "bool" and (negate or not eq) and (i + 1 >= len(args) or args[i + 1].startswith("--")
                                                      or args[i + 1].lower() not in ("true", "false", "1", "0", "yes", "no")):
            out[name] = not negate
            i += 1
            continue
        if not eq:
            require(i + 1 < len(args), f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        out[name] = _coerce(value, ann, name)
        i += 1
    return out


def read_yaml(path: str | Path, what: str, hint: str) -> dict:
    """The mapping in the YAML file at ``path``; a missing file or bad YAML is one line naming it."""
    p = Path(path)
    require(p.is_file(), f"{what} {p} not found: give the path of {hint}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    require(isinstance(raw, dict), f"{what} {p}: expected a mapping of settings at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (CLI args or a dotted dict)."""
    raw = read_yaml(path, "recipe", "a YAML file (see recipes/)") if path is not None else {}
    over = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    for key, value in over.items():
        head, _, tail = key.partition(".")
        if tail:
            section = raw.setdefault(head, {})
            require(isinstance(section, dict), f"{head}: expected a mapping in the recipe")
            section[tail] = value
        else:
            raw[key] = value
    return _build(TrainConfig, raw)
