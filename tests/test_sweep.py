"""``mlx_qlora sweep`` on the tiny 4-bit llama: a grid completes and writes its outputs, an
interrupted sweep resumes without re-running finished trials, bad sweep files fail in one line."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_qlora.apps import sweep as sweep_mod
from mlx_qlora.apps.sweep import run_sweep
from mlx_qlora.apps.sweep_config import load_sweep
from mlx_qlora.cli import main
from mlx_qlora.errors import UserError
from mlx_qlora.train.config import load_config

ROWS = [
    "table: t1\ncolumns: Player, No., Position\nQ: What position does number 3 play?\nA: SELECT Position FROM t1 WHERE No. = '3'",
    "table: t1\ncolumns: Player, No., Position\nQ: Who wears number 42?\nA: SELECT Player FROM t1 WHERE No. = '42'",
    "table: t2\ncolumns: School, Year\nQ: Which school won in 1999?\nA: SELECT School FROM t2 WHERE Year = '1999'",
    "table: t2\ncolumns: School, Year\nQ: How many years did Butler win?\nA: SELECT COUNT Year FROM t2 WHERE School = 'Butler'",
]


@pytest.fixture(scope="module")
def recipe(tiny_llama_q4, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sweep_data")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": ROWS[i % 4]}) + "\n" for i in range(16)))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS))
    r = d / "base.yaml"
    r.write_text(yaml.safe_dump({"model": str(tiny_llama_q4), "out_dir": str(d / "adapters"), "steps": 100,
                                 "batch_size": 4, "eval_every": 0, "checkpoint_every": 0, "data": {"train": str(d)},
                                 "lora": {"rank": 8, "alpha": 16.0}, "optim": {"learning_rate": 1e-3}}))
    return r


def write_sweep(path: Path, recipe: Path, search: dict, **kw) -> Path:
    doc = {"recipe": str(recipe), "out_dir": str(path.parent / "out"), "sampler": "grid",
           "train": {"steps": 4, "eval_batches": 1}, "search": search, **kw}
    path.write_text(yaml.safe_dump(doc))
    return path


def read_csv(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


def test_grid_sweep_writes_table_png_and_best_recipe(recipe, tiny_hf_llama, tmp_path):
    cache = tmp_path / "bases"
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 4], "base_bits": [4, 8]},
                     base={"source": str(tiny_hf_llama), "group_size": 32, "cache": str(cache)})
    res = run_sweep(load_sweep(sw))
    out = Path(res["out_dir"])
    rows = read_csv(out)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    assert sorted((int(r["lora.rank"]), int(r["base_bits"])) for r in rows) == [(2, 4), (2, 8), (4, 4), (4, 8)]
    cfg = load_sweep(sw)
    assert sorted(cache.iterdir()) == [cfg.base_path(4), cfg.base_path(8)]       # converted once each
    assert cfg.base_path(4).name.startswith(tiny_hf_llama.name) and cfg.base_path(4).name.endswith("-q4-g32")
    trainable = {int(r["lora.rank"]): int(r["trainable"]) for r in rows}
    assert trainable[4] == 2 * trainable[2] > 0          # LoRA parameters grow linearly with rank
    for r in rows:
        summary = json.loads((out / "trials" / f"trial_{int(r['trial']):03d}" / "adapter" / "summary.json").read_text())
        assert float(r["val_loss"]) == summary["val_loss"] and math.isfinite(summary["val_loss"])
        assert int(r["adapter_bytes"]) > 4 * int(r["trainable"]) and float(r["peak_rss_gib"]) > 0
        assert float(r["tok_per_s"]) > 0
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert res["best"].number == int(best["trial"])
    md = (out / "results.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 5 and table[1].startswith(f"| best | #{best['trial']} |")
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# mlx_qlora train -c {out / 'best.yaml'}")
    cfg = load_config(out / "best.yaml")
    assert cfg.lora.rank == int(best["lora.rank"]) and cfg.steps == 100       # the base recipe's steps
    assert cfg.model == str(load_sweep(sw).base_path(int(best["base_bits"])))


def test_interrupted_sweep_resumes_without_repeating(recipe, tmp_path, monkeypatch):
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"lora.rank": [2, 4], "lr": [1e-3, 1e-2]})
    real, calls = sweep_mod._train_trial, []

    def interrupt_third(cfg, values, tdir):
        calls.append(dict(values))
        if len(calls) == 3:
            tdir.mkdir(parents=True)            # a partial trial directory, as a real Ctrl-C leaves
            raise KeyboardInterrupt
        return real(cfg, values, tdir)

    monkeypatch.setattr(sweep_mod, "_train_trial", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(sw))
    out = tmp_path / "out"
    assert [r["state"] for r in read_csv(out)] == ["complete", "complete"]
    interrupted = calls[2]

    calls.clear()
    monkeypatch.setattr(sweep_mod, "_train_trial", lambda c, v, t: calls.append(dict(v)) or real(c, v, t))
    run_sweep(load_sweep(sw))
    assert len(calls) == 2 and calls[0] == interrupted     # only the two unfinished settings, interrupted first
    rows = read_csv(out)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    assert len({(r["lora.rank"], r["optim.learning_rate"]) for r in rows}) == 4
    assert len(list((out / "trials").iterdir())) == 4       # the partial directory was dropped

    calls.clear()
    run_sweep(load_sweep(sw))                                # finished: nothing runs again
    assert calls == []


@pytest.mark.parametrize("doc,message", [
    ({"sampel": "grid"}, r"unknown setting sampel; did you mean sampler\?"),
    ({"search": {"lora.rnak": [4]}}, r"unknown setting search.lora.rnak; did you mean search.lora.rank\?"),
    ({"search": {"rank": [0, 4]}}, r"search.rank: value 0: lora.rank=0: use a positive integer"),
    ({"search": {"rank": []}}, r"search.rank: the list of values is empty"),
    ({"search": {"rank": 8}}, r"search.rank=8: give a list of values"),
    ({"search": {"lr": {"low": 1e-3, "high": 1e-4}}}, r"search.lr: a range needs numbers low < high"),
    ({"search": {"lr": {"low": 1e-4, "hihg": 1e-3}}}, r"search.lr.hihg: unknown range key; did you mean high\?"),
    ({"search": {"lr": {"low": 1e-4, "high": 1e-3}}}, r"search.lr: sampler grid needs a list of values"),
    ({"search": {"base_bits": [4, 5]}}, r"search.base_bits: 5 is not a bit width"),
    ({"search": {"base_bits": [4, 8]}}, r"search.base_bits needs base.source"),
    ({"sampler": "bayes"}, r"sampler='bayes': use one of grid, random, tpe"),
    ({"sampler": "random", "trials": None}, r"trials=None: give the number of trials"),
    ({"trials": 9}, r"trials=9: sampler grid has 2 settings"),
    ({"train": {"stepz": 3}}, r"with the sweep's train overrides: unknown setting stepz; did you mean steps\?"),
])
def test_bad_sweep_files_name_the_fix(recipe, tmp_path, doc, message):
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 4]})
    raw = yaml.safe_load(sw.read_text())
    raw.update(doc)
    sw.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=message):
        load_sweep(sw)


def test_cli_bad_sweep_is_one_line_exit_2(recipe, tmp_path):
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 4]}, sampel="grid")
    r = CliRunner().invoke(main, ["sweep", "-c", str(sw)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: unknown setting sampel; did you mean sampler?"]


def test_existing_out_dir_is_refused_unless_same_sweep_or_force(recipe, tmp_path):
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 4]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"output .*out already exists and holds no sweep; .* --force"):
        run_sweep(load_sweep(sw))
    assert (out / "notes.txt").read_text() == "mine"        # untouched
    other = load_sweep(write_sweep(tmp_path / "other.yaml", recipe, {"rank": [4, 8]}))
    (out / "notes.txt").unlink()
    (out / "sweep.json").write_text(json.dumps(other.identity()))
    with pytest.raises(UserError, match=r"holds a different sweep \(its search differ\)"):
        run_sweep(load_sweep(sw))
    assert json.loads((out / "sweep.json").read_text())["search"] == {"rank": [4, 8]}


def test_task_metric_per_trial(recipe, tmp_path):
    """A task: block adds `mlx_qlora eval --task` on each trial's adapter to the table."""
    task = {"type": "exact-match", "data": str(recipe.parent), "split": "valid", "answer_prefix": "A:",
            "max_rows": 2, "engine": "mlx"}
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2]}, task=task)
    run_sweep(load_sweep(sw))
    out = tmp_path / "out"
    [row] = read_csv(out)
    result = json.loads((out / "trials" / "trial_000" / "eval.json").read_text())
    assert result["rows"] == 2 and float(row["task_metric"]) == result["exact_match"]
    assert 0.0 <= result["exact_match"] <= 1.0
    header = (out / "results.md").read_text().splitlines()[2]
    assert "| valid loss | exact match % |" in header


def test_failed_trial_is_recorded_and_the_sweep_goes_on(recipe, tmp_path):
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"layers": ["last 2", "last 9"]})   # the model has 2
    res = run_sweep(load_sweep(sw))
    rows = {r["lora.layers"]: r for r in read_csv(tmp_path / "out")}
    assert rows["last 2"]["state"] == "complete" and rows["last 9"]["state"] == "failed"
    assert "lora.layers=9: the model has only 2 layers" in rows["last 9"]["error"]
    assert res["best"].values == {"lora.layers": "last 2"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("| failed | ") == 1 and "the model has only 2 layers" in md


def test_resumed_random_sweep_draws_new_settings(recipe, tmp_path, monkeypatch):
    """A resumed process reseeds its sampler: a fresh seed-0 stream would redraw trial 0's setting."""
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 3, 4, 5, 6, 7, 8, 9]}, sampler="random", trials=2)
    real, calls = sweep_mod._train_trial, []

    def interrupt_second(cfg, values, tdir):
        calls.append(values["lora.rank"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, values, tdir)

    monkeypatch.setattr(sweep_mod, "_train_trial", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(sw, trials=3))
    first, interrupted = calls
    calls.clear()
    monkeypatch.setattr(sweep_mod, "_train_trial", lambda c, v, t: calls.append(v["lora.rank"]) or real(c, v, t))
    run_sweep(load_sweep(sw, trials=3))
    assert calls[0] == interrupted and len(calls) == 2 and calls[1] != first
    assert sorted(int(r["lora.rank"]) for r in read_csv(tmp_path / "out")) == sorted([first, interrupted, calls[1]])


def test_task_select_ranks_by_the_metric_not_the_loss(recipe, tmp_path, monkeypatch):
    """task.select: the best trial (table order, best.yaml, Optuna's direction) is the highest metric,
    here deliberately the trial with the worse valid loss."""
    task = {"type": "exact-match", "data": str(recipe.parent), "split": "valid", "answer_prefix": "A:",
            "max_rows": 2, "engine": "mlx", "select": True}
    sw = write_sweep(tmp_path / "sweep.yaml", recipe, {"rank": [2, 4]}, task=task)
    fake = {2: (0.5, 0.9), 4: (0.4, 0.1)}            # rank -> (valid loss, metric): rank 2 loses on loss

    def train(cfg, values, tdir):
        loss, metric = fake[values["lora.rank"]]
        return {"val_loss": loss, "val_loss_start": 1.0, "task_metric": metric, "tok_per_s": 1.0,
                "peak_rss_gib": 1.0, "trainable": 1, "adapter_bytes": 1, "wall_s": 1.0}

    monkeypatch.setattr(sweep_mod, "_train_trial", train)
    res = run_sweep(load_sweep(sw))
    assert res["best"].values == {"lora.rank": 2}
    out = tmp_path / "out"
    assert "exact match 90.0%" in (out / "best.yaml").read_text().splitlines()[1]
    first = (out / "results.md").read_text().splitlines()[4]
    assert first.startswith("| best | #") and "| 90.0 |" in first
    import optuna
    study = optuna.load_study(study_name=sweep_mod.STUDY, storage=f"sqlite:///{out / 'study.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.best_value == 0.9
    # without select the same trials rank by valid loss
    task["select"] = False
    (tmp_path / "b").mkdir()
    sw = write_sweep(tmp_path / "b" / "sweep.yaml", recipe, {"rank": [2, 4]}, task=task)
    assert run_sweep(load_sweep(sw))["best"].values == {"lora.rank": 4}
