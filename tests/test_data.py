"""Data loading: formats, prompt masking, splitting, truncation, batching and bad-data errors."""
from __future__ import annotations

import json

import mlx_qlora  # noqa: F401
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_qlora.train.data import batch_order, collate, load_dataset, padding_waste, read_jsonl
from mlx_qlora.errors import UserError
from mlx_qlora.train.config import DataConfig


@pytest.fixture(scope="module")
def tok(tiny_hf_llama):
    return load_tokenizer(tiny_hf_llama)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def masked_text(tok, ex) -> list[str]:
    """Decoded runs of consecutive loss tokens."""
    runs, cur = [], []
    for t, m in zip(ex.tokens, ex.mask):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_text_format_appends_eos_and_trains_on_all(tok, tmp_path):
    write(tmp_path / "train.jsonl", [{"text": f"the cat sat {i}"} for i in range(20)])
    ds = load_dataset(DataConfig(train=str(tmp_path)), tok)
    assert ds.fmt == "text" and len(ds.train) == 19 and len(ds.valid) == 1   # 5% held out
    ex = ds.train[0]
    assert ex.tokens[-1] == tok.eos_token_id and ex.mask[1:].all() and not ex.mask[0]


def test_completions_mask_only_completion(tok, tmp_path):
    rows = [{"q": "What is 2+2?", "a": "four"}, {"q": "Name a colour.", "a": "red"}]
    cfg = DataConfig(train=str(write(tmp_path / "t.jsonl", rows)), valid=str(write(tmp_path / "v.jsonl", rows[:1])),
                     prompt_key="q", completion_key="a")
    ds = load_dataset(cfg, tok)
    assert ds.fmt == "completions" and len(ds.train) == 2 and len(ds.valid) == 1
    assert masked_text(tok, ds.train[0]) == ["four<|im_end|>\n"]
    cfg.mask_prompt = False
    ex = load_dataset(cfg, tok).train[0]
    assert ex.mask[1:].all()


def test_chat_masks_every_assistant_turn(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye"}]
    ds = load_dataset(DataConfig(train=str(write(tmp_path / "c.jsonl", [{"messages": msgs}] * 3))), tok)
    assert ds.fmt == "chat"
    ex = ds.train[0]
    assert masked_text(tok, ex) == ["hello<|im_end|>\n", "bye<|im_end|>\n"]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(list(ex.tokens)) == full


@pytest.mark.parametrize("content,message", [
    ("{\"text\": \"ok\"}\n{\"text\": oops}\n", r"line 2: not valid JSON"),
    ("", r"is empty"),
    ("\n\n", r"is empty"),
    ("[1, 2]\n", r"line 1: expected a JSON object"),
    ("{\"input\": \"x\"}\n", r"line 1: cannot tell the format from keys \['input'\]"),
    ("{\"text\": \"a b c\"}\n{\"txt\": \"x\"}\n", r"line 2: missing key 'text' \(format text\); keys found: txt"),
    ("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n", r"line 1: message 0 has unknown role 'bot'"),
    ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n", r"line 1: no assistant message"),
    ("{\"messages\": \"hi\"}\n", r"line 1: 'messages' must be a non-empty list"),
    ("{\"text\": 5}\n", r"line 1: 'text' must be a string"),
])
def test_bad_data_gives_one_line(tok, tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_dataset(DataConfig(train=str(tmp_path)), tok)
    assert "\n" not in str(e.value)


def test_missing_paths(tok, tmp_path):
    with pytest.raises(UserError, match="needs train.jsonl"):
        load_dataset(DataConfig(train=str(tmp_path)), tok)
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_long_rows_truncated_and_counted(tok, tmp_path):
    rows = [{"text": "word " * 50}] * 3 + [{"text": "short"}] * 3
    rows += [{"prompt": "x" * 200, "completion": "y"}]  # the completion falls past the cut: dropped
    write(tmp_path / "train.jsonl", rows[:6])
    write(tmp_path / "valid.jsonl", [{"prompt": "x" * 200, "completion": "y"}, {"prompt": "a", "completion": "b"}])
    ds = load_dataset(DataConfig(train=str(tmp_path), max_seq_len=24), tok)
    assert ds.truncated == 4 and ds.dropped == 1
    assert max(len(e.tokens) for e in ds.train) == 24 and len(ds.valid) == 1


def test_batches_deterministic_cover_all_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 300, 1000)]
    a, b = batch_order(lengths, 4, seed=1, epoch=0), batch_order(lengths, 4, seed=1, epoch=0)
    assert a == b and a != batch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for bt in a for i in bt) == list(range(1000))

    class E:
        def __init__(self, n):
            self.tokens = np.zeros(n + 1)
    waste = padding_waste([E(n) for n in lengths], 4, seed=1)
    naive = 1 - sum(lengths) / sum(4 * max(lengths[i:i + 4]) for i in range(0, 1000, 4))
    assert waste < 0.05 < naive


def test_collate_shifts_and_masks():
    from mlx_qlora.train.data import Example
    exs = [Example(np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1], bool)),
           Example(np.array([5, 6], np.int32), np.array([0, 1], bool))]
    b = collate(exs, pad_id=0)
    assert b.inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert b.targets.tolist() == [[2, 3, 4], [6, 0, 0]]
    assert b.loss_index.tolist() == [1, 2, 3] and b.real_tokens == 4 and b.padded_tokens == 6
