"""eval.json_fields: validity, term / (term, sentiment) P/R/F1 and per-field accuracy."""
import json

import pytest

from mlx_qlora.eval.json_fields import aspect_counts, field_accuracy, parse_prediction, score_json_fields

REF = {"aspects": [{"term": "food", "sentiment": "positive"}, {"term": "staff", "sentiment": "negative"}]}
SCHEMA = {"type": "object", "required": ["aspects"],
          "properties": {"aspects": {"type": "array"}}, "additionalProperties": False}


def test_perfect_and_case_insensitive():
    pred = {"aspects": [{"term": "Food ", "sentiment": "POSITIVE"}, {"term": "staff", "sentiment": "negative"}]}
    s = score_json_fields([json.dumps(pred)], [REF])
    assert s["json_validity"] == 1.0 and s["term_f1"] == 1.0 and s["pair_f1"] == 1.0
    assert s["field_accuracy"] == {"aspects": 1.0}


def test_partial_counts():
    pred = {"aspects": [{"term": "food", "sentiment": "negative"}, {"term": "wine", "sentiment": "positive"},
                        {"term": "staff", "sentiment": "negative"}]}
    assert aspect_counts(pred, REF) == (2, 3, 2, 1)
    s = score_json_fields([pred], [REF])
    assert s["term_precision"] == pytest.approx(2 / 3) and s["term_recall"] == 1.0
    assert s["pair_precision"] == pytest.approx(1 / 3) and s["pair_recall"] == pytest.approx(0.5)
    assert s["pair_f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert s["field_accuracy"]["aspects"] == 0.0


def test_invalid_predictions_cost_recall_only():
    s = score_json_fields(["{not json", None, json.dumps(REF)], [REF, REF, REF])
    assert s["valid"] == 1 and s["json_validity"] == pytest.approx(1 / 3)
    assert s["term_precision"] == 1.0 and s["term_recall"] == pytest.approx(1 / 3)


def test_schema_and_multisets():
    assert parse_prediction('{"aspects": [], "x": 1}', SCHEMA) is None
    assert parse_prediction('{"aspects": []}', SCHEMA) == {"aspects": []}
    twice = {"aspects": [{"term": "food", "sentiment": "positive"}] * 2}
    assert aspect_counts({"aspects": twice["aspects"][:1]}, twice) == (1, 1, 2, 1)
    assert field_accuracy([{"a": "X", "b": 1}, None], [{"a": "x", "b": 2}, {"a": "y", "b": 2}]) == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError):
        score_json_fields([REF], [])


def test_score_file_counts_error_rows_as_invalid(tmp_path):
    from mlx_qlora.eval.json_fields import score_file

    p = tmp_path / "out.jsonl"
    p.write_text(json.dumps({"text": "a", "reference": REF, "result": REF}) + "\n"
                 + json.dumps({"text": "b", "reference": REF, "error": "cut"}) + "\n")
    s = score_file(str(p))
    assert s["n"] == 2 and s["valid"] == 1 and s["pair_precision"] == 1.0 and s["pair_recall"] == 0.5
