"""Preference pairs from a model's own mistakes (``mlx_qlora make-pairs``), for DPO after SFT.

Every row of a *training* file (completions or chat rows, as ``eval --task`` reads them) is
answered greedily by the model with its adapter (e.g. the SFT one); a wrong answer makes a pair
``{"prompt": [messages], "chosen": [gold answer], "rejected": [the model's answer]}`` in the chat
form that ``train --method dpo`` reads. Right answers are skipped (nothing to prefer). Wrong means
not equal to the reference after collapsing whitespace, and, when both parse as JSON, not the
same JSON value (key order and spacing are not mistakes). Pairs are made from training rows only:
pairs from validation rows would train on the answers the run is judged by.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_file
from ..errors import require


def wrong(answer: str, reference: str) -> bool:
    """The answer differs from the reference (whitespace collapsed; JSON compared as values)."""
    if " ".join(answer.split()) == " ".join(reference.split()):
        return False
    try:
        return json.loads(answer) != json.loads(reference)
    except (ValueError, RecursionError):
        return True


def make_pairs(model: str, data: str, out: str, adapter: str | None = None, max_rows: int = 0,
               max_tokens: int = 256, engine: str = "auto", force: bool = False, say=print) -> dict:
    """Answer every row of ``data`` (a file, or train.jsonl in a directory) and write the wrong
    ones as pairs to ``out``; returns {"rows", "pairs", "right", "out"}."""
    from ..eval.config import EvalConfig
    from ..eval.tasks import evaluate_task, task_items
    from ..train.data import detect_format, read_jsonl

    require(force or not Path(out).exists(), f"{out} exists; give another -o path or --force to replace it")
    cfg = EvalConfig(model=model, adapter=adapter, data=data, split="train", task="exact-match",
                     max_rows=max_rows, engine=engine)
    cfg.task_cfg.max_tokens = max_tokens
    path = Path(cfg.data_cfg.train)
    line, first = read_jsonl(path)[0]
    require(detect_format(first, cfg.data_cfg, f"{path} line {line}") != "text",
            f"{path}: make-pairs needs completions or chat rows (prompt and answer apart); "
            "text rows have no prompt to pair answers with")
    items = task_items(path, cfg.data_cfg, cfg.task_cfg, say=lambda *_: None)
    result = evaluate_task(cfg, say)
    rows, right = [], 0
    for it, ex in zip(items, result["examples"]):
        if not wrong(ex["answer"], ex["reference"]):
            right += 1
            continue
        rows.append({"prompt": it.messages, "chosen": [{"role": "assistant", "content": ex["reference"]}],
                     "rejected": [{"role": "assistant", "content": ex["answer"]}], "source_line": it.line})
    require(rows, f"the model answered all {len(items)} rows right: no pair to write (use rows it gets wrong)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, force=True) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    say(f"pairs: {len(rows)} of {len(items)} rows answered wrong -> {out} ({right} right, skipped)")
    return {"rows": len(items), "pairs": len(rows), "right": right, "out": str(out)}
