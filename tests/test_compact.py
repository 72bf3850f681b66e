"""The compact answer form (infer/compact.py): JSON -> lines -> JSON is the identity on every MAMS
row, prepare-reviews writes it, and schemas it cannot express are refused with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qlora.infer.compact import CompactForm
from mlx_qlora.infer.schema_file import load_schema
from mlx_qlora.apps.reviews import read_mams
from mlx_qlora.errors import UserError

MAMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mams"


def test_round_trip_every_mams_row():
    form = CompactForm.from_schema(load_schema())
    assert [f.name for f in form.fields] == ["term", "sentiment"]      # free text first, enums last
    n = 0
    for split in ("train.xml", "val.xml"):
        for _, target in read_mams(MAMS / split):
            text = form.to_text(target)
            assert text.count("\n") == len(target["aspects"])
            assert form.to_json(text) == target
            n += 1
    assert n > 4700


def test_expansion_of_handwritten_answers():
    form = CompactForm.from_schema(load_schema())
    assert form.to_json("") == {"aspects": []}
    assert form.to_json(" lobster/mango summer roll positive\n drinks neutral\n") == {
        "aspects": [{"term": "lobster/mango summer roll", "sentiment": "positive"},
                    {"term": "drinks", "sentiment": "neutral"}]}
    # split from the right: a term may hold spaces and even an enum word
    assert form.to_json(" positive vibe neutral\n") == {"aspects": [{"term": "positive vibe", "sentiment": "neutral"}]}
    with pytest.raises(ValueError, match="sentiment 'great'"):
        form.to_json(" food great\n")
    with pytest.raises(ValueError, match="line 2"):
        form.to_json(" food positive\n negative\n")
    # the lines start with a space (compact.LEAD); read back without it too (a detokenizer may drop it)
    assert form.to_text({"aspects": [{"term": "food", "sentiment": "positive"}]}) == " food positive\n"
    assert form.to_json("food positive\n") == form.to_json(" food positive\n")
    # a line equal to an earlier one (a repetition loop) is read once; a different sentiment is kept
    assert form.to_json(" staff positive\n food neutral\n staff positive\n staff positive\n") == {
        "aspects": [{"term": "staff", "sentiment": "positive"}, {"term": "food", "sentiment": "neutral"}]}
    assert len(form.to_json(" staff positive\n staff negative\n")["aspects"]) == 2
    two = CompactForm(form.key, form.fields, None, 2)       # minItems 2: the repeat is what makes it valid
    assert len(two.to_json(" staff positive\n staff positive\n")["aspects"]) == 2


BAD = [
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}, "exactly one property"),
    ({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}, "required": ["xs"]},
     "array of objects"),
    ({"type": "object", "required": ["xs"], "properties": {"xs": {"type": "array", "items": {
        "type": "object", "required": ["a", "b"],
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}}}}, "at most one free-text"),
    ({"type": "object", "required": ["xs"], "properties": {"xs": {"type": "array", "items": {
        "type": "object", "required": ["a"],
        "properties": {"a": {"enum": ["very good", "bad"]}}}}}}, "without spaces"),
    ({"type": "object", "required": ["xs"], "properties": {"xs": {"type": "array", "items": {
        "type": "object", "required": [],
        "properties": {"a": {"type": "string"}}}}}}, "must be required"),
]


@pytest.mark.parametrize("schema,why", BAD)
def test_schemas_it_cannot_express(schema, why):
    with pytest.raises(UserError, match=why) as e:
        CompactForm.from_schema(schema)
    assert "--answer json" in str(e.value)


def test_prepare_reviews_compact(tmp_path):
    out = tmp_path / "mc"
    r = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "prepare-reviews", "--data", str(MAMS),
                        "-o", str(out), "--answer", "compact"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    form = CompactForm.from_schema(load_schema())
    rows = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    refs = [json.loads(x) for x in (out / "val_reviews.jsonl").read_text().splitlines()]
    assert len(rows) == len(refs) == 500
    for row, ref in zip(rows, refs):
        system, user, answer = (m["content"] for m in row["messages"])
        assert system == form.instruction(load_schema()) and user == ref["text"]
        assert form.to_json(answer) == ref["reference"]
    # a schema the form cannot express: one line, exit 2, nothing written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD[0][0]))
    r = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "prepare-reviews", "--data", str(MAMS),
                        "-o", str(tmp_path / "none"), "--answer", "compact", "--schema", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
