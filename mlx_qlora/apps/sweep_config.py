"""The sweep recipe: a base training recipe, per-trial overrides, and the search space.

```yaml
recipe: recipes/smollm2-wikisql.yaml     # the base training recipe
out_dir: sweeps/smollm2                  # study.db, trials/, results.{md,csv,png}, best.yaml
sampler: grid                            # grid | random | tpe
trials: 4                                # grid: defaults to the grid's size
train: {steps: 20}                       # overrides for every trial (short runs)
base: {source: smollm2, group_size: 32}  # what base_bits converts (cached under base.cache)
search:
  lora.rank: [4, 8]                      # a list: choose among these values
  optim.learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}   # a range (random / tpe)
  base_bits: [4, 8]
```

Search keys are training settings by dotted path or unique name (``rank``, ``lr``, ``layers``)
plus ``base_bits``. Every value of the space is checked against the base recipe before any
trial runs, so a bad value fails at once with the setting's own message.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, require
from ..model.quant import ALLOWED_BITS, ALLOWED_GROUP_SIZES
from ..train.config import ALIASES, _build, _field_types, load_config, read_yaml

SAMPLERS = ("grid", "random", "tpe")
BASE_BITS = "base_bits"
NOT_SEARCHABLE = {"model", "out_dir", "resume", "progress"}
PRIMITIVE = (str, int, float, bool, type(None))


@dataclass
class Param:
    """One searched setting: a list of choices, or a numeric range."""

    key: str                                # dotted training setting, or base_bits
    choices: list | None = None             # categorical
    low: float | None = None                # range
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def encoded(self) -> bool:
        """Optuna stores only plain values: lists such as [q_proj, v_proj] travel as JSON text."""
        return self.choices is not None and not all(isinstance(c, PRIMITIVE) for c in self.choices)

    def labels(self) -> list:
        return [json.dumps(c) for c in self.choices] if self.encoded else list(self.choices)

    def decode(self, value):
        return json.loads(value) if self.encoded else value

    def suggest(self, trial):
        if self.choices is not None:
            return self.decode(trial.suggest_categorical(self.key, self.labels()))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {self.choices}"
        return f"{self.key} in [{self.low:g}, {self.high:g}]{' (log)' if self.log else ''}"


@dataclass
class BaseConfig:
    source: str | None = None               # what `mlx_qlora convert` takes: GGUF, HF dir/id, smollm2
    group_size: int = 64                    # quantization group size of converted bases
    cache: str = "~/.cache/mlx_qlora/bases"  # converted bases, reused across sweeps

    def __post_init__(self):
        require(self.source is None or (isinstance(self.source, str) and self.source),
                f"base.source={self.source!r}: give what `mlx_qlora convert` takes (a .gguf, an HF directory or id, smollm2)")
        require(self.group_size in ALLOWED_GROUP_SIZES,
                f"base.group_size={self.group_size!r}: use one of {', '.join(map(str, ALLOWED_GROUP_SIZES))}")
        require(isinstance(self.cache, str) and self.cache, f"base.cache={self.cache!r}: give a directory")


TASK_METRICS = {"exact-match": "exact_match", "json-fields": "pair_f1"}   # key in `mlx_qlora eval --json`


@dataclass
class TaskSpec:
    """A task metric per trial: ``mlx_qlora eval --task`` on the trial's adapter (greedy answers)."""

    type: str = "exact-match"              # exact-match | json-fields
    data: str = ""                         # JSONL file, or a directory holding SPLIT.jsonl
    split: str = "valid"                   # with a directory: which file (keep test for the end)
    answer_prefix: str | None = None       # text rows: the answer follows its last occurrence, e.g. "A:"
    max_rows: int = 20                     # rows answered per trial
    engine: str = "auto"                   # generation engine: auto | mlx | llama.cpp
    select: bool = False                   # choose the best trial by this metric (higher is better), not valid loss
    answer: str = "json"                   # json-fields: the rows' answer form, json | compact (infer/compact.py)

    def __post_init__(self):
        require(self.type in TASK_METRICS, f"task.type={self.type!r}: use one of {', '.join(TASK_METRICS)}")
        require(isinstance(self.data, str) and Path(self.data).exists(),
                f"task.data={self.data!r}: give an existing JSONL file or a directory holding {self.split}.jsonl")
        require(_is_int(self.max_rows) and self.max_rows >= 1, f"task.max_rows={self.max_rows!r}: use a positive integer")
        require(self.engine in ("auto", "mlx", "llama.cpp"), f"task.engine={self.engine!r}: use auto, mlx or llama.cpp")
        require(isinstance(self.select, bool), f"task.select={self.select!r}: use true or false")
        require(self.answer in ("json", "compact") and (self.answer == "json" or self.type == "json-fields"),
                f"task.answer={self.answer!r}: use json, or compact with type json-fields")

    @property
    def metric(self) -> str:
        return TASK_METRICS[self.type]


@dataclass
class SweepConfig:
    recipe: str = ""                        # base training recipe (YAML)
    out_dir: str = "sweeps/sweep"
    sampler: str = "tpe"                    # grid | random | tpe
    trials: int | None = None               # grid: defaults to the grid's size
    seed: int = 0                           # the sampler's seed
    train: dict = field(default_factory=dict)     # overrides of the recipe for every trial
    base: Any = field(default_factory=BaseConfig)
    search: dict = field(default_factory=dict)
    task: Any = None                        # TaskSpec: a task metric per trial (optional)
    force: bool = False                     # replace an out_dir holding another sweep
    path: str = ""                          # the sweep file (set by load_sweep)
    params: list = field(default_factory=list, init=False)

    def __post_init__(self):
        if isinstance(self.base, dict):
            self.base = _build(BaseConfig, self.base, "base.")
        if self.task is not None:
            self.task = _build(TaskSpec, self.task, "task.")
        require(isinstance(self.recipe, str) and self.recipe, "recipe is empty: give the base training recipe, e.g. recipes/smollm2-wikisql.yaml")
        require(Path(self.recipe).is_file(), f"recipe {self.recipe} not found: give the path of a training recipe (see recipes/)")
        require(isinstance(self.out_dir, str) and self.out_dir, "out_dir is empty: give a directory for the sweep")
        require(self.sampler in SAMPLERS, f"sampler={self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        require(_is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}: use an integer >= 0")
        require(isinstance(self.train, dict), f"train: expected a mapping of training settings, got {self.train!r}")
        # optim: {warmup_steps: 2} changes that one setting, not the recipe's whole optim section
        flat = {}
        for k, v in self.train.items():
            flat.update({f"{k}.{k2}": v2 for k2, v2 in v.items()} if isinstance(v, dict) else {k: v})
        self.train = flat
        bad = sorted(NOT_SEARCHABLE & set(self.train))
        require(not bad, f"train.{bad[0] if bad else ''}: set by the sweep for each trial; remove it")
        try:
            load_config(self.recipe, self.train)
        except UserError as e:
            raise UserError(f"recipe {self.recipe} with the sweep's train overrides: {e}") from None
        require(isinstance(self.search, dict) and self.search,
                "search is empty: give the settings to search, e.g. search: {lora.rank: [4, 8]}")
        self.params = [self._param(k, v) for k, v in self.search.items()]
        if self.sampler == "grid":
            ranges = [name for name, p in zip(self.search, self.params) if p.choices is None]
            require(not ranges, f"search.{ranges[0] if ranges else ''}: sampler grid needs a list of values; "
                                "give one, or use sampler: random or tpe for ranges")
            size = self.grid_size
            require(self.trials is None or (_is_int(self.trials) and 1 <= self.trials <= size),
                    f"trials={self.trials!r}: sampler grid has {size} settings; use 1 to {size} (or leave trials out)")
            self.trials = self.trials or size
        require(_is_int(self.trials) and self.trials >= 1,
                f"trials={self.trials!r}: give the number of trials (a positive integer) for sampler {self.sampler}")
        if self.searches(BASE_BITS):
            require(self.base.source, "search.base_bits needs base.source: what to convert at each bit width "
                                      "(e.g. base: {source: smollm2, group_size: 32})")

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.params if p.choices is not None)

    def searches(self, key: str) -> bool:
        return any(p.key == key for p in self.params)

    def base_path(self, bits: int) -> Path:
        """Where the base converted at ``bits`` is cached."""
        src = self.base.source
        local = Path(src).expanduser()
        if local.exists():   # a local file or directory: its name and where it is
            where = hashlib.sha256(str(local.resolve()).encode()).hexdigest()[:8]
            slug = f"{local.stem if local.is_file() else local.name}-{where}"
        else:                # smollm2, or a hub id owner/name
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "--", src).strip("-")
        return Path(self.base.cache).expanduser() / f"{slug}-q{bits}-g{self.base.group_size}"

    def identity(self) -> dict:
        """What makes two runs the same study (trials may grow; out_dir, force and the recipe's
        comments may differ)."""
        settings = json.dumps(load_config(self.recipe).to_dict(), sort_keys=True)   # comments may change
        recipe_hash = hashlib.sha256(settings.encode()).hexdigest()[:16]
        ident = {"recipe": self.recipe, "recipe_settings_sha256": recipe_hash, "sampler": self.sampler, "seed": self.seed,
                 "train": self.train, "base": dataclasses.asdict(self.base), "search": self.search}
        if self.task is not None:
            ident["task"] = dataclasses.asdict(self.task)
        return ident

    def _param(self, name, spec) -> Param:
        key = resolve_key(str(name))
        where = f"search.{name}"
        if isinstance(spec, list):
            require(spec, f"{where}: the list of values is empty; give at least one value")
            labels = [json.dumps(v, sort_keys=True) for v in spec]
            require(len(set(labels)) == len(labels), f"{where}: {spec!r} repeats a value; list each once")
            p = Param(key, choices=list(spec))
        elif isinstance(spec, dict):
            known = ("low", "high", "log", "step")
            for k in spec:
                near = difflib.get_close_matches(str(k), known, n=1)
                require(k in known, f"{where}.{k}: unknown range key" + (f"; did you mean {near[0]}?" if near else
                                                                         f"; use {', '.join(known)}"))
            low, high = spec.get("low"), spec.get("high")
            text = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(low, str) or isinstance(high, str) else ""
            require(_is_num(low) and _is_num(high) and low < high,
                    f"{where}: a range needs numbers low < high, got low={low!r} high={high!r}{text}")
            log, step = spec.get("log", False), spec.get("step")
            require(isinstance(log, bool), f"{where}.log={log!r}: use true or false")
            require(not log or low > 0, f"{where}: a log range needs low > 0, got {low!r}")
            require(step is None or (_is_num(step) and step > 0 and not log),
                    f"{where}.step={step!r}: use a positive number, and no step with log: true")
            p = Param(key, low=low, high=high, log=log, step=step,
                      integer=all(_is_int(v) for v in (low, high) + ((step,) if step is not None else ())))
        else:
            raise UserError(f"{where}={spec!r}: give a list of values like [4, 8] or a range like "
                            "{low: 1.0e-4, high: 1.0e-3, log: true}")
        for v in p.values_to_check():
            if key == BASE_BITS:
                require(v in ALLOWED_BITS, f"{where}: {v!r} is not a bit width; use some of "
                                           f"{', '.join(map(str, ALLOWED_BITS))}")
                continue
            try:
                load_config(self.recipe, {**self.train, key: v})
            except UserError as e:
                raise UserError(f"{where}: value {v!r}: {e}") from None
        return p


def resolve_key(name: str) -> str:
    """``rank`` / ``lr`` / ``lora.rank`` -> the dotted setting; base_bits stays itself."""
    types = _field_types()
    leaf: dict[str, list[str]] = {}
    for path in types:
        leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    norm = name.replace("-", "_")
    if norm == BASE_BITS:
        return BASE_BITS
    key = ALIASES.get(norm, norm)
    if key not in types:
        paths = leaf.get(key, [])
        require(len(paths) < 2, f"search.{name} is ambiguous: use one of {', '.join(paths)}")
        if not paths:
            near = difflib.get_close_matches(norm, list(types) + list(leaf) + [BASE_BITS], n=1)
            raise UserError(f"unknown setting search.{name}" + (f"; did you mean search.{near[0]}?" if near else
                                                                "; use a training setting such as lora.rank, or base_bits"))
        key = paths[0]
    require(key not in NOT_SEARCHABLE, f"search.{name}: not searchable (the sweep sets it per trial)")
    return key


def load_sweep(path: str | Path, out_dir: str | None = None, trials: int | None = None,
               force: bool = False) -> SweepConfig:
    """The sweep file at ``path``; ``out_dir`` / ``trials`` given on the command line win."""
    p = Path(path)
    raw = read_yaml(p, "sweep file", "a sweep YAML (see recipes/smollm2-sweep.yaml)")
    require("path" not in raw and "params" not in raw, f"sweep file {p}: 'path'/'params' are not settings; remove them")
    if out_dir is not None:
        raw["out_dir"] = out_dir
    if trials is not None:
        raw["trials"] = trials
    cfg = _build(SweepConfig, {**raw, "force": force})
    cfg.path = str(p)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

