"""Scores for structured (JSON) predictions against references.

Public API (all pure Python, no heavy imports; fractions in [0, 1], not percentages):

``score_json_fields(predictions, references, schema=None, list_field="aspects",
                    key="term", label="sentiment") -> dict``
    The one call ``eval --task json-fields`` and the extraction report use. ``predictions`` are
    model outputs, each a JSON string, an already-parsed object, or ``None`` (no output / error);
    ``references`` are the gold objects (or JSON strings). Returns::

        {"n": rows, "valid": rows whose prediction parsed (and matched ``schema`` if given),
         "json_validity": valid / n,
         "term_precision", "term_recall", "term_f1":   aspect-term match,
         "pair_precision", "pair_recall", "pair_f1":   (term, label) match,
         "field_accuracy": {field: accuracy} for every top-level reference field}

    Term matching is case-insensitive exact match after trimming whitespace, micro-averaged over
    all rows and counted as multisets (a term said twice in a review must be predicted twice).
    An invalid prediction counts as predicting nothing, so it lowers recall, not precision.

``parse_prediction(text, schema=None) -> dict | None``
    The parsed object, or ``None`` if it is not JSON or fails the schema (needs ``jsonschema``).

``aspect_counts(pred, ref, list_field, key, label) -> (tp_terms, n_pred, n_ref, tp_pairs)``
    Per-row counts, for callers that aggregate differently.

``field_accuracy(preds, refs) -> dict``
    Generic per-field exact-match accuracy (lists compared as lists, strings case-insensitively)
    over the top-level fields of the references.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable


def parse_prediction(text: Any, schema: dict | None = None) -> dict | None:
    """A prediction as a JSON object, or ``None`` when it does not parse or fails ``schema``."""
    if text is None:
        return None
    obj = text
    if isinstance(text, (str, bytes)):
        try:
            obj = json.loads(text)
        except (ValueError, TypeError):
            return None
    if not isinstance(obj, dict):
        return None
    if schema is not None:
        import jsonschema
        if not jsonschema.Draft202012Validator(schema).is_valid(obj):
            return None
    return obj


def _norm(s: Any) -> str:
    return " ".join(str(s).split()).lower()


def _items(obj: dict | None, list_field: str, key: str, label: str) -> tuple[Counter, Counter]:
    terms, pairs = Counter(), Counter()
    if not obj:
        return terms, pairs
    for item in obj.get(list_field) or []:
        if isinstance(item, dict) and key in item:
            terms[_norm(item[key])] += 1
            pairs[(_norm(item[key]), _norm(item.get(label, "")))] += 1
    return terms, pairs


def aspect_counts(pred: dict | None, ref: dict, list_field: str = "aspects", key: str = "term",
                  label: str = "sentiment") -> tuple[int, int, int, int]:
    """(matched terms, predicted items, reference items, matched (term, label) pairs) for one row."""
    pt, pp = _items(pred, list_field, key, label)
    rt, rp = _items(ref, list_field, key, label)
    return (sum((pt & rt).values()), sum(pt.values()), sum(rt.values()), sum((pp & rp).values()))


def _prf(tp: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_ref if n_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return _norm(a) == _norm(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def field_accuracy(preds: Iterable[dict | None], refs: Iterable[dict]) -> dict[str, float]:
    """Exact-match accuracy of each top-level reference field (a missing prediction is wrong)."""
    hits: Counter = Counter()
    total: Counter = Counter()
    for pred, ref in zip(preds, refs):
        for field, want in ref.items():
            total[field] += 1
            hits[field] += bool(pred) and field in pred and _same(pred[field], want)
    return {f: hits[f] / total[f] for f in total}


def score_json_fields(predictions: list, references: list, schema: dict | None = None,
                      list_field: str = "aspects", key: str = "term",
                      label: str = "sentiment") -> dict:
    """Validity, term P/R/F1, (term, label) P/R/F1 and per-field accuracy; see the module doc."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds = [parse_prediction(p, schema) for p in predictions]
    refs = [parse_prediction(r) or {} for r in references]
    tp = n_pred = n_ref = tp_pair = 0
    for pred, ref in zip(preds, refs):
        a, b, c, d = aspect_counts(pred, ref, list_field, key, label)
        tp, n_pred, n_ref, tp_pair = tp + a, n_pred + b, n_ref + c, tp_pair + d
    tprec, trec, tf1 = _prf(tp, n_pred, n_ref)
    pprec, prec_, pf1 = _prf(tp_pair, n_pred, n_ref)
    valid = sum(p is not None for p in preds)
    n = len(preds)
    return {"n": n, "valid": valid, "json_validity": valid / n if n else 0.0,
            "term_precision": tprec, "term_recall": trec, "term_f1": tf1,
            "pair_precision": pprec, "pair_recall": prec_, "pair_f1": pf1,
            "field_accuracy": field_accuracy(preds, refs)}


def score_file(path: str, pred_field: str = "result", ref_field: str = "reference", **kw) -> dict:
    """Score an ``mlx_qlora extract`` output: each line's ``result`` (absent on error rows, which
    count as invalid) against its ``reference``."""
    preds, refs = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            preds.append(row.get(pred_field))
            refs.append(row[ref_field])
    return score_json_fields(preds, refs, **kw)


if __name__ == "__main__":  # python -m mlx_qlora.eval.json_fields OUTPUT.jsonl [...]
    import sys

    for p in sys.argv[1:]:
        s = score_file(p)
        print(f"{p}: rows {s['n']}, JSON valid {100 * s['json_validity']:.1f}%, term F1 {100 * s['term_f1']:.1f}, "
              f"(term, sentiment) F1 {100 * s['pair_f1']:.1f}")
