"""JSONL datasets -> token rows with loss masks -> length-bucketed padded batches.

Formats (one JSON object per line):
  text         {"text": "..."}                                  loss on every token
  completions  {"prompt": "...", "completion": "..."}           loss on the completion only*
  chat         {"messages": [{"role": "user", "content": ...}]} loss on every assistant turn*
  (* unless data.mask_prompt is false.) Keys are remappable (data.text_key, ...).

Completions and chat are rendered with the tokenizer's chat template (completions fall back to
plain prompt + completion when the tokenizer has none). Each assistant turn's span is found by
rendering the conversation up to that turn, so masking works for any template whose renders of
a prefix are a prefix of the full render (true for ChatML, Llama, Mistral, Gemma templates).

Batches: rows are shuffled, sorted by length inside windows of 64 batches and cut into batches,
whose order is shuffled again; the order depends only on (seed, epoch), so a resumed run sees the
same batches. Padding waste (pad tokens / all tokens in batches) is reported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, require
from .config import DataConfig

ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 8 << 20  # one row; a longer line is refused before it is decoded
SORT_WINDOW = 64  # batches whose rows are length-sorted together (larger: less padding, less shuffling)


@dataclass
class Example:
    tokens: np.ndarray   # (L,) int32
    mask: np.ndarray     # (L,) bool: token j is a loss target (predicted from tokens[:j])


@dataclass
class Dataset:
    train: list[Example]
    valid: list[Example]
    fmt: str
    truncated: int = 0   # rows cut to max_seq_len
    dropped: int = 0     # rows with no loss token left after truncation


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; malformed JSON or non-object rows raise UserError with the line."""
    require(path.is_file(), f"data file {path} not found: give a JSONL file or a directory with train.jsonl")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            rows.extend((n, row) for row in [parse_jsonl_line(raw, path, n)] if row is not None)
    require(rows, f"{path} is empty: it needs one JSON object per line, e.g. {{\"text\": \"...\"}}")
    return rows


def parse_jsonl_line(raw: bytes, path, n: int) -> dict | None:
    """One JSONL line (bytes, as read with a ``MAX_LINE_BYTES + 1`` limit) -> its object, None
    for a blank line; anything else is a UserError naming the file, the line and the fix."""
    require(len(raw) <= MAX_LINE_BYTES, f"{path} line {n} is over {MAX_LINE_BYTES >> 20} MiB; split it into "
                                         "shorter rows (one training example per line)")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line {n}: byte {e.start + 1} is not UTF-8 ({raw[e.start:e.start + 1]!r}); "
                        "re-save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{path} line {n}: JSON nested too deeply; flatten the row") from None
    require(isinstance(row, dict), f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
    return row


def detect_format(row: dict, cfg: DataConfig, where: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_key in row:
        return "chat"
    if cfg.prompt_key in row and cfg.completion_key in row:
        return "completions"
    if cfg.text_key in row:
        return "text"
    raise UserError(f"{where}: cannot tell the format from keys {sorted(row)}; expected '{cfg.text_key}', "
                    f"'{cfg.prompt_key}'+'{cfg.completion_key}' or '{cfg.messages_key}' (set data.format and the *_key options)")


class Encoder:
    """Turns rows of one format into Examples with the tokenizer (and its chat template)."""

    def __init__(self, tokenizer, cfg: DataConfig, fmt: str):
        self.tok, self.cfg, self.fmt = tokenizer, cfg, fmt
        self.eos = tokenizer.eos_token_id
        self.has_template = getattr(tokenizer, "chat_template", None) is not None
        require(fmt != "chat" or self.has_template, "data.format=chat needs a tokenizer with a chat_template; "
                                                    "use format text or completions for this model")

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def _render(self, messages, gen_prompt: bool) -> list[int]:
        try:  # transformers renders in Jinja's ImmutableSandboxedEnvironment: a template cannot reach Python
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
        except Exception as e:  # jinja2 TemplateError / SecurityError, raise_exception(...) in the template
            raise UserError(f"the tokenizer's chat template failed on these messages ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); fix the template or use format text") from None
        return self._encode(text)

    def _field(self, row, key, where) -> str:
        require(key in row, f"{where}: missing key '{key}' (format {self.fmt}); keys found: {', '.join(sorted(row)) or 'none'}")
        v = row[key]
        require(isinstance(v, str), f"{where}: '{key}' must be a string, got {type(v).__name__}")
        return v

    def __call__(self, row: dict, where: str) -> Example:
        if self.fmt == "text":
            toks = self._encode(self._field(row, self.cfg.text_key, where))
            if self.eos is not None and (not toks or toks[-1] != self.eos):
                toks.append(self.eos)
            mask = np.ones(len(toks), bool)
            mask[0] = False
        elif self.fmt == "completions":
            prompt = self._field(row, self.cfg.prompt_key, where)
            completion = self._field(row, self.cfg.completion_key, where)
            if self.has_template:
                return self._chat([{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": completion}], where)
            p = self._encode(prompt)
            toks = p + self._encode(completion) + ([self.eos] if self.eos is not None else [])
            mask = np.zeros(len(toks), bool)
            mask[len(p) if self.cfg.mask_prompt else 1:] = True
        else:
            msgs = row.get(self.cfg.messages_key)
            require(isinstance(msgs, list) and msgs, f"{where}: '{self.cfg.messages_key}' must be a non-empty list of "
                                                     f"{{\"role\", \"content\"}} objects")
            return self._chat(msgs, where)
        return Example(np.array(toks, np.int32), mask)

    def _chat(self, msgs: list, where: str) -> Example:
        for i, m in enumerate(msgs):
            require(isinstance(m, dict) and "role" in m and "content" in m,
                    f"{where}: message {i} needs 'role' and 'content' keys")
            require(m["role"] in ROLES, f"{where}: message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        require(any(m["role"] == "assistant" for m in msgs), f"{where}: no assistant message, so nothing to learn")
        toks = self._render(msgs, False)
        mask = np.zeros(len(toks), bool)
        if not self.cfg.mask_prompt:
            mask[1:] = True
            return Example(np.array(toks, np.int32), mask)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self._render(msgs[:i], True))
            end = len(self._render(msgs[:i + 1], False)) if i + 1 < len(msgs) else len(toks)
            mask[start:end] = True
        return Example(np.array(toks, np.int32), mask)


def _resolve_paths(cfg: DataConfig) -> tuple[Path, Path | None]:
    train = Path(cfg.train)
    if train.is_dir():
        valid = train / "valid.jsonl"
        train = train / "train.jsonl"
        require(train.is_file(), f"{cfg.train}: a data directory needs train.jsonl (and optionally valid.jsonl)")
        return train, Path(cfg.valid) if cfg.valid else (valid if valid.is_file() else None)
    return train, Path(cfg.valid) if cfg.valid else None


def _encode_file(path: Path, enc_factory, cfg: DataConfig, counts: dict) -> tuple[list[Example], str]:
    rows = read_jsonl(path)
    first_line, first = rows[0]
    fmt = detect_format(first, cfg, f"{path} line {first_line}")
    enc = enc_factory(fmt)
    out = []
    for n, row in rows:
        ex = enc(row, f"{path} line {n}")
        require(len(ex.tokens) >= 2, f"{path} line {n}: the row encodes to {len(ex.tokens)} token(s); need at least 2")
        if len(ex.tokens) > cfg.max_seq_len:
            counts["truncated"] += 1
            ex = Example(ex.tokens[:cfg.max_seq_len], ex.mask[:cfg.max_seq_len])
        if not ex.mask.any():
            counts["dropped"] += 1
            continue
        out.append(ex)
    require(out, f"{path}: no row has a loss token within max_seq_len={cfg.max_seq_len}; raise data.max_seq_len")
    return out, fmt


def load_dataset(cfg: DataConfig, tokenizer, seed: int = 0) -> Dataset:
    """Read, encode, truncate and split the data described by ``cfg``."""
    train_path, valid_path = _resolve_paths(cfg)
    counts = {"truncated": 0, "dropped": 0}
    encoders: dict[str, Encoder] = {}

    def factory(fmt):
        if fmt not in encoders:
            encoders[fmt] = Encoder(tokenizer, cfg, fmt)
        return encoders[fmt]

    train, fmt = _encode_file(train_path, factory, cfg, counts)
    if valid_path is not None:
        valid, _ = _encode_file(valid_path, factory, cfg, counts)
    else:
        train, valid = hold_out(train, cfg.valid_fraction, seed, f"{train_path} has a single row: add rows")
    return Dataset(train, valid, fmt, counts["truncated"], counts["dropped"])


def hold_out(train: list, valid_fraction: float, seed: int, too_few: str) -> tuple[list, list]:
    """(train, valid): ``valid_fraction`` of the items (at least 1, at most all but 1) held out at
    random by ``seed``, each side in file order; ``too_few`` is the error when there is one item."""
    require(len(train) >= 2, f"{too_few} or give data.valid")
    n_valid = min(max(1, round(len(train) * valid_fraction)), len(train) - 1)
    perm = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in sorted(perm[n_valid:])], [train[i] for i in sorted(perm[:n_valid])]


def encode_jsonl(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[Example], str, dict]:
    """One JSONL file encoded exactly as training encodes it (format, masks, truncation):
    ``(examples, format, {"truncated": n, "dropped": n})``. ``mlx_qlora eval`` scores these."""
    counts = {"truncated": 0, "dropped": 0}
    encoders: dict[str, Encoder] = {}

    def factory(fmt):
        return encoders.setdefault(fmt, Encoder(tokenizer, cfg, fmt))

    examples, fmt = _encode_file(Path(path), factory, cfg, counts)
    return examples, fmt, counts


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of every batch of one epoch; deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * SORT_WINDOW
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [[int(i) for i in batches[k]] for k in order]


@dataclass
class Batch:
    inputs: np.ndarray     # (B, T) int32
    targets: np.ndarray    # (B, T) int32
    loss_index: np.ndarray  # flat indices into (B*T) where the loss is on
    real_tokens: int       # non-pad input tokens
    padded_tokens: int     # B * T
    lengths: np.ndarray | None = None  # (B,) real input tokens per row

    @property
    def n_loss(self) -> int:
        return int(self.loss_index.size)


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad to the longest row; causal attention keeps pads from touching real tokens."""
    t = max(len(e.tokens) for e in examples) - 1
    inputs = np.full((len(examples), t), pad_id, np.int32)
    targets = np.zeros((len(examples), t), np.int32)
    mask = np.zeros((len(examples), t), bool)
    lengths = np.array([len(e.tokens) - 1 for e in examples], np.int64)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        inputs[i, :n] = e.tokens[:-1]
        targets[i, :n] = e.tokens[1:]
        mask[i, :n] = e.mask[1:]
    return Batch(inputs, targets, np.flatnonzero(mask.reshape(-1)).astype(np.int32), int(lengths.sum()), inputs.size,
                 lengths)


def padding_waste(examples: list[Example], batch_size: int, seed: int) -> float:
    """Share of batch positions that are padding over one epoch of ``batch_order``."""
    lengths = [len(e.tokens) - 1 for e in examples]
    real = padded = 0
    for b in batch_order(lengths, batch_size, seed, 0):
        real += sum(lengths[i] for i in b)
        padded += len(b) * max(lengths[i] for i in b)
    return 1 - real / padded
