"""Settings of ``mlx_qlora eval``: ``EvalConfig`` (validated on creation) and ``TaskConfig``.

Precedence: defaults < the recipe (``-c``: its ``data`` section and ``task:`` block) < flags.
Every bad value is one ``UserError`` naming the value and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import UserError, require

TASKS = ("exact-match", "json-fields")
SPLITS = ("test", "valid", "train")
ENGINES = ("auto", "mlx", "llama.cpp")
MLX_BITS = (16, 8, 6, 4, 3, 2)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0")


@dataclass
class TaskConfig:
    """A generation metric: prompt from each row, greedy answer, compared with the reference.

    Rows: ``completions`` (prompt -> completion), ``chat`` (the last assistant message is the
    reference) or ``text``, cut at the last ``answer_prefix`` (WikiSQL: ``"A:"``).
    """
    type: str = "exact-match"
    answer_prefix: str | None = None   # text rows: the reference is what follows its last occurrence
    max_rows: int = 0                  # score the first N rows (0: all)
    max_tokens: int = 256              # per answer
    show: int = 3                      # worst examples printed
    stop: list[str] | None = None      # None: a newline when the reference is one line
    list_field: str = "aspects"        # json-fields: the list of items, its key and label
    key: str = "term"
    label: str = "sentiment"
    answer: str = "json"               # json-fields: the rows' answer form, json | compact (infer/compact.py)
    schema: str | None = None          # answer compact: the schema the lines expand into (default aspects.json)

    def __post_init__(self):
        require(self.type in TASKS, f"--task {self.type!r} is unknown; use one of {', '.join(TASKS)}")
        for name in ("max_rows", "max_tokens", "show"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= (1 if name == "max_tokens" else 0),
                    f"task.{name}={v!r}: use a non-negative integer")
        require(self.answer_prefix is None or (isinstance(self.answer_prefix, str) and self.answer_prefix),
                f"task.answer_prefix={self.answer_prefix!r}: use the text that precedes each answer, e.g. 'A:'")
        require(self.answer in ("json", "compact"), f"task.answer={self.answer!r}: use json or compact")
        require(self.answer == "json" or self.type == "json-fields",
                f"task.answer={self.answer!r} is for --task json-fields; drop it or use json-fields")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        require(self.stop is None or all(isinstance(s, str) and s for s in self.stop),
                f"task.stop={self.stop!r}: use a list of non-empty strings")

    @classmethod
    def from_block(cls, block: dict, where: str) -> "TaskConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(block) - set(names))
        require(not unknown, f"{where}: unknown task key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return cls(**block)


@dataclass
class EvalConfig:
    model: str                         # MLX model directory or .gguf file
    data: str | None = None            # JSONL file or a directory holding SPLIT.jsonl
    adapter: str | None = None         # LoRA adapter directory (from train)
    split: str = "test"                # with a data directory: which file
    recipe: str | None = None          # -c: data settings and task: block
    task: str | None = None            # exact-match | json-fields (None: the recipe's, if any)
    answer_prefix: str | None = None
    answer: str | None = None          # json-fields: json | compact answers (None: the recipe's, else json)
    max_rows: int | None = None        # rows scored (loss and task); None: the task's / all
    batch_size: int = 4
    max_seq_len: int | None = None     # None: the recipe's, else 2048
    engine: str = "auto"               # generation engine
    quant_sweep: bool = False
    bits: tuple[int, ...] = MLX_BITS
    group_size: int = 64
    gguf_types: tuple[str, ...] = ("f16", "q8_0", "q4_1", "q4_0")
    out: str | None = None             # quant sweep: where models, table and PNG go
    force: bool = False
    json_out: str | None = None        # also write the results as JSON here
    task_cfg: TaskConfig | None = field(default=None, init=False)
    data_cfg: object = field(default=None, init=False)   # train.config.DataConfig

    def __post_init__(self):
        from ..train.config import DataConfig, load_config

        require(bool(self.model), "give MODEL: an MLX model directory or a .gguf file")
        require(self.model.endswith(".gguf") or Path(self.model).is_dir(),
                f"model {self.model!r} not found: give an MLX model directory (mlx_qlora convert -o DIR) "
                "or a .gguf file")
        require(not self.model.endswith(".gguf") or Path(self.model).is_file(), f"GGUF file {self.model!r} not found")
        require(self.split in SPLITS, f"--split {self.split!r}: use one of {', '.join(SPLITS)}")
        require(self.engine in ENGINES, f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size}: use a positive integer")
        require(self.max_rows is None or self.max_rows >= 0, f"--max-rows {self.max_rows}: use 0 (all) or more")
        recipe = load_config(self.recipe, {"model": self.model}) if self.recipe else None
        block = dict(recipe.task or {}) if recipe else {}
        if self.task is not None:
            require(self.task in TASKS, f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}")
            if block.get("type") not in (None, self.task):
                block = {}
            block["type"] = self.task
        if self.answer_prefix is not None:
            block["answer_prefix"] = self.answer_prefix
        if self.max_rows is not None and block:
            block["max_rows"] = self.max_rows
        if self.answer is not None and block:
            block["answer"] = self.answer
        self.task_cfg = TaskConfig.from_block(block, f"recipe {self.recipe} task") if block else None
        data_cfg = recipe.data if recipe else DataConfig()
        if self.max_seq_len is not None:
            data_cfg.max_seq_len = self.max_seq_len
        self.data = self.data or (data_cfg.train if recipe else None)
        require(self.data or self.quant_sweep, "--data is missing: give a JSONL file or a directory with test.jsonl "
                                               "(or -c RECIPE to use its data)")
        if self.data:
            data_cfg.train = str(self.data_file())
            data_cfg.valid = None
        self.data_cfg = DataConfig(**{f.name: getattr(data_cfg, f.name) for f in fields(DataConfig)})
        if self.quant_sweep:
            require(self.data, "--quant-sweep scores perplexity: give --data FILE_OR_DIR")
            require(not self.adapter, "--quant-sweep takes a model, not an adapter: fuse it first (mlx_qlora fuse "
                                      "MODEL ADAPTER -o DIR --dequantize)")
            require(not self.model.endswith(".gguf"), "--quant-sweep starts from an MLX model directory, not a GGUF")
            bad = [b for b in self.bits if b not in MLX_BITS]
            require(not bad, f"--bits {','.join(map(str, bad))}: use values from {','.join(map(str, MLX_BITS))}")
            bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
            require(not bad, f"--gguf-types {','.join(bad)}: use values from {','.join(GGUF_TYPES)}")
            require(self.group_size in (32, 64, 128), f"--group-size {self.group_size}: use 32, 64 or 128")
            require(self.bits or self.gguf_types, "--quant-sweep with no --bits and no --gguf-types: nothing to score")

    def data_file(self) -> Path:
        """The JSONL file to score: --data itself, or SPLIT.jsonl inside it."""
        p = Path(str(self.data)).expanduser()
        if p.is_dir():
            f = p / f"{self.split}.jsonl"
            have = sorted(x.stem for x in p.glob("*.jsonl"))
            require(f.is_file(), f"--data {self.data}: no {f.name} there (found: {', '.join(have) or 'no JSONL'}); "
                                 f"pick one with --split {'|'.join(have) or 'test'} or give the file")
            return f
        require(p.is_file(), f"--data {self.data}: no such file or directory; give a JSONL file or a directory "
                             "with test.jsonl / valid.jsonl")
        return p


def parse_list(text: str | None, cast, option: str) -> tuple:
    """'16,8,4' -> (16, 8, 4); '' or 'none' -> ()."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: give a comma-separated list, e.g. {option} 16,8,4") from None
