"""MAMS-ATSA restaurant reviews (XML) -> prompt/completion rows for training and JSONL for extraction.

Each ``<sentence>`` has a ``<text>`` and ``<aspectTerm term= polarity= from= to=>`` children. The
target is ``{"aspects": [{"term", "sentiment"}]}`` with terms sorted by their offset (order of
appearance; the XML is not always in that order). The messages come from ``prompt.messages``
with the schema's instruction, the same call extraction makes, so training and use agree.

Writes into OUT: ``train.jsonl`` and ``valid.jsonl`` ({"messages": system, user, assistant},
what ``mlx_qlora train`` reads; loss on the assistant turn) and ``val_reviews.jsonl`` / ``train_reviews.jsonl`` ({"id", "text",
"reference"}, what ``mlx_qlora extract`` reads; its output then carries the reference to score).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_file
from ..errors import UserError, require
from ..infer.schema_file import load_schema
from .answer import Answer
from .prompt import messages

SPLITS = {"train": ("train.xml", "train.jsonl"), "val": ("val.xml", "valid.jsonl")}
SENTIMENTS = ("positive", "negative", "neutral")


def read_mams(path: str | Path) -> list[tuple[str, dict]]:
    """(review text, target object) per sentence, aspects in order of appearance."""
    p = Path(path)
    require(p.is_file(), f"MAMS file {str(p)!r} not found; point --data at the folder with train.xml and val.xml")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise UserError(f"{p}: not valid XML ({e}); use the MAMS-ATSA files") from None
    out = []
    for n, sent in enumerate(root.iter("sentence"), 1):
        text = (sent.findtext("text") or "").strip()
        require(bool(text), f"{p}: sentence {n} has no <text>")
        terms = []
        for t in sent.iter("aspectTerm"):
            pol = t.get("polarity")
            require(pol in SENTIMENTS, f"{p}: sentence {n}: polarity {pol!r} is not one of {', '.join(SENTIMENTS)}")
            terms.append((int(t.get("from", 0)), t.get("term", ""), pol))
        terms.sort(key=lambda x: x[0])
        out.append((text, {"aspects": [{"term": term, "sentiment": pol} for _, term, pol in terms]}))
    require(bool(out), f"{p}: no <sentence> elements; use the MAMS-ATSA files")
    return out


def completion(target: dict) -> str:
    """The training target text: the JSON the model learns to write."""
    return json.dumps(target, ensure_ascii=False)


@dataclass
class PrepareConfig:
    data: str = "../shared/data/mams"
    out_dir: str = "runs/mams"
    schema: str | None = None
    force: bool = False
    answer: str = "json"              # what the model learns to write: json | compact (compact.py)

    def __post_init__(self):
        require(self.answer in ("json", "compact"), f"--answer {self.answer!r}: use json or compact")
        require(Path(self.data).is_dir(), f"--data {self.data!r}: not a folder; give the folder with MAMS train.xml and val.xml")


def _write_jsonl(path: Path, rows: list[dict], force: bool) -> None:
    with atomic_file(path, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def prepare_reviews(cfg: PrepareConfig) -> dict[str, int]:
    """Write the training and extraction files; returns rows per written file."""
    # the system turn and the target's form from the same Answer that `extract` decodes with, so the
    # training rows' prompts are extract's prompts
    answer = Answer.of(load_schema(cfg.schema), cfg.answer, "none")
    instruction, write = answer.instruction(), (answer.form.to_text if answer.form else completion)
    out = Path(cfg.out_dir)
    files = {}  # every row is built (and every problem raised) before the first file is written
    for split, (xml_name, train_name) in SPLITS.items():
        pairs = read_mams(Path(cfg.data) / xml_name)
        files[train_name] = [{"messages": messages(instruction, text, write(t))} for text, t in pairs]
        files[f"{split}_reviews.jsonl"] = [{"id": i, "text": text, "reference": t} for i, (text, t) in enumerate(pairs)]
    for name, rows in files.items():
        _write_jsonl(out / name, rows, cfg.force)
    return {name: len(rows) for name, rows in files.items()}
