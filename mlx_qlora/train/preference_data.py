"""Preference pairs: JSONL rows -> (chosen, rejected) token rows with answer-only loss masks.

Row forms (the keys are ``data.prompt_key``, ``preference.chosen_key``, ``preference.rejected_key``):
  text   {"prompt": "...", "chosen": "...", "rejected": "..."}
  chat   {"chosen": [messages], "rejected": [messages]}      the shared leading messages are the
         prompt (TRL's implicit prompt), the rest of each list (assistant turns) is the answer;
         or {"prompt": [messages] or "...", "chosen": [messages], "rejected": [messages]}.
Text rows are rendered as one user turn and one assistant turn with the chat template (plain
prompt + answer + EOS when the tokenizer has none), as ``data.Encoder`` renders completions.
Only the answer tokens are loss tokens: the log-probability of an answer is the sum over them.

Bad rows stop loading with one line naming the file, the line and the fix: a missing or empty
answer, identical answers (nothing to prefer), a prompt that leaves no answer token inside
``data.max_seq_len``. Answers longer than the room left are truncated, as SFT rows are.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import require
from .config import DataConfig
from .data import Batch, Encoder, Example, _resolve_paths, collate, hold_out, read_jsonl
from .preference_config import PreferenceConfig


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None   # DPO: the reference's (chosen, rejected) log-probs

    @property
    def tokens(self) -> np.ndarray:
        """The longer side's tokens: the length that batching sorts by and pads to."""
        return max(self.chosen.tokens, self.rejected.tokens, key=len)


@dataclass
class PairDataset:
    train: list[Pair]
    valid: list[Pair]
    fmt: str
    truncated: int = 0   # pairs with an answer cut at max_seq_len
    dropped: int = 0     # always 0: a pair that cannot fit is an error, not a silent drop

    @staticmethod
    def collate(pairs: list[Pair]) -> "PairBatch":
        return collate_pairs(pairs)


@dataclass
class PairBatch(Batch):
    """``collate`` of the chosen rows then the rejected rows (one forward for both, as TRL's
    concatenated forward). ``n_loss`` counts pairs: the loop divides summed pair losses by it."""
    pairs: int = 0
    row_of_loss: np.ndarray | None = None    # (loss tokens,) the row (0 .. 2*pairs-1) of each loss token
    answer_tokens: np.ndarray | None = None  # (2*pairs,) loss tokens per row
    ref: list | None = None                  # the pairs' cached reference log-probs (DPO)

    @property
    def n_loss(self) -> int:
        return self.pairs


def collate_pairs(pairs: list[Pair], pad_id: int = 0) -> PairBatch:
    b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    width = b.inputs.shape[1]
    rows = (b.loss_index // width).astype(np.int32)
    counts = np.bincount(rows, minlength=2 * len(pairs)).astype(np.int32)
    return PairBatch(b.inputs, b.targets, b.loss_index, b.real_tokens, b.padded_tokens, b.lengths,
                     pairs=len(pairs), row_of_loss=rows, answer_tokens=counts, ref=[p.ref for p in pairs])


class PairEncoder:
    """One JSONL row -> Pair, with ``data.Encoder``'s rendering (chat template, EOS)."""

    def __init__(self, tokenizer, data: DataConfig, pref: PreferenceConfig):
        self.data, self.pref = data, pref
        # answers are always masked in (mask_prompt) and rendered as completions / chat
        cfg = dataclasses.replace(data, mask_prompt=True)
        self.text = Encoder(tokenizer, cfg, "completions")
        self.chat = Encoder(tokenizer, cfg, "chat") if self.text.has_template else None

    def __call__(self, row: dict, where: str) -> Pair:
        ck, rk, pk = self.pref.chosen_key, self.pref.rejected_key, self.data.prompt_key
        for k in (ck, rk):
            require(k in row, f"{where}: missing key '{k}'; a preference row needs '{pk}', '{ck}' and '{rk}' "
                              f"strings, or '{ck}'/'{rk}' message lists (keys found: {', '.join(sorted(row)) or 'none'})")
        chosen, rejected = row[ck], row[rk]
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt = row.get(pk)
            require(isinstance(prompt, str), f"{where}: '{pk}' must be a string when '{ck}' and '{rk}' are strings "
                                             f"(got {type(prompt).__name__}); add the prompt")
            require(chosen.strip() and rejected.strip(), f"{where}: an empty '{ck}' or '{rk}' answer; give both answers")
            require(chosen != rejected, f"{where}: '{ck}' and '{rk}' are identical, so there is nothing to prefer; "
                                        "drop the row or give a worse rejected answer")
            return Pair(*(self._text(prompt, a, where) for a in (chosen, rejected)))
        require(isinstance(chosen, list) and isinstance(rejected, list),
                f"{where}: '{ck}' and '{rk}' must both be strings or both be lists of {{\"role\", \"content\"}} messages")
        require(self.chat is not None, f"{where}: chat-form pairs need a tokenizer with a chat_template; "
                                       f"give '{pk}', '{ck}', '{rk}' as strings for this model")
        prompt = row.get(pk)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt is None:   # TRL's implicit prompt: the messages both lists start with
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        require(isinstance(prompt, list) and prompt, f"{where}: no prompt: '{ck}' and '{rk}' share no leading "
                                                     f"message and '{pk}' is absent; add the user turn")
        require(chosen != rejected, f"{where}: '{ck}' and '{rk}' are identical, so there is nothing to prefer; "
                                    "drop the row or give a worse rejected answer")
        return Pair(*(self._chat(prompt, a, where, k) for a, k in ((chosen, ck), (rejected, rk))))

    def _text(self, prompt: str, answer: str, where: str) -> Example:
        return self.text({self.data.prompt_key: prompt, self.data.completion_key: answer}, where)

    def _chat(self, prompt: list, answer: list, where: str, key: str) -> Example:
        require(answer and all(isinstance(m, dict) and m.get("role") == "assistant" for m in answer),
                f"{where}: the '{key}' answer after the shared prompt must be assistant message(s); "
                "end both lists with the differing assistant turn")
        msgs = prompt + answer
        full = self.chat._chat(msgs, where)   # validates roles and contents, masks every assistant turn
        start = len(self.chat._render(prompt, True))
        require(start <= len(full.tokens), f"{where}: the chat template renders the prompt longer than the "
                                           "whole conversation; fix the template or use text pairs")
        mask = np.zeros(len(full.tokens), bool)
        mask[start:] = full.mask[start:]     # the answer's assistant turns only, not earlier ones
        return Example(full.tokens, mask)


def _fit(pair: Pair, max_len: int, where: str, pref: PreferenceConfig) -> tuple[Pair, bool]:
    """Cut both sides to ``max_len`` tokens; an error when a side keeps no answer token."""
    sides = []
    for ex, key in ((pair.chosen, pref.chosen_key), (pair.rejected, pref.rejected_key)):
        first = int(np.argmax(ex.mask)) if ex.mask.any() else len(ex.tokens)
        require(ex.mask.any(), f"{where}: the '{key}' answer encodes to no token; give a non-empty answer")
        require(first < max_len, f"{where}: the prompt is {first} tokens, so no '{key}' token fits in "
                                 f"data.max_seq_len={max_len}; raise data.max_seq_len or shorten the prompt")
        sides.append(Example(ex.tokens[:max_len], ex.mask[:max_len]))
    cut = any(len(s.tokens) < len(e.tokens) for s, e in zip(sides, (pair.chosen, pair.rejected)))
    a, b = sides
    same = len(a.tokens) == len(b.tokens) and bool((a.tokens == b.tokens).all())
    require(not same, f"{where}: '{pref.chosen_key}' and '{pref.rejected_key}' are the same tokens" +
            (f" within data.max_seq_len={max_len}; raise it" if cut else "; drop the row or change an answer"))
    return Pair(a, b), cut


def _load_file(path: Path, enc: PairEncoder, data: DataConfig, pref: PreferenceConfig, counts: dict) -> list[Pair]:
    out = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        pair, cut = _fit(enc(row, where), data.max_seq_len, where, pref)
        counts["truncated"] += cut
        out.append(pair)
    return out


def load_pairs(data: DataConfig, tokenizer, pref: PreferenceConfig, seed: int = 0) -> PairDataset:
    """The train / valid pairs described by ``data`` (valid held out as ``data.load_dataset`` does)."""
    require(data.format in ("auto", "chat", "completions"),
            f"data.format={data.format!r}: preference pairs are read from their keys; use format auto")
    train_path, valid_path = _resolve_paths(data)
    enc = PairEncoder(tokenizer, data, pref)
    counts = {"truncated": 0}
    train = _load_file(train_path, enc, data, pref, counts)
    if valid_path is not None:
        valid = _load_file(valid_path, enc, data, pref, counts)
    else:
        train, valid = hold_out(train, data.valid_fraction, seed, f"{train_path} has a single pair: add pairs")
    chat = enc.chat is not None
    return PairDataset(train, valid, "preference pairs" + (" (chat template)" if chat else ""), counts["truncated"])

