"""Every recipe loads and validates; config layering and validation messages."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from mlx_qlora.apps.sweep_config import load_sweep
from mlx_qlora.errors import UserError
from mlx_qlora.train.config import LoraConfig, TrainConfig, load_config, parse_layers, parse_overrides

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "smollm2-wikisql.yaml" for p in RECIPES)


def is_sweep(path: Path) -> bool:
    return "search" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path, monkeypatch, tmp_path):
    first = path.read_text().splitlines()[0]
    if is_sweep(path):
        monkeypatch.chdir(path.parent.parent)     # its base recipe is named from the repository root
        data = ((yaml.safe_load(path.read_text()) or {}).get("task") or {}).get("data")
        if data and not Path(data).exists():      # made by the command its header names (prepare-reviews)
            shutil.copytree(path.parent, tmp_path / "recipes")
            (tmp_path / data).mkdir(parents=True)
            monkeypatch.chdir(tmp_path)
        sweep = load_sweep(path)
        assert sweep.trials >= 4 and sweep.params and load_config(sweep.recipe, sweep.train).model
        assert first.startswith("# ") and f"mlx_qlora sweep -c recipes/{path.name}" in first
        return
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.model and cfg.data.train
    assert first.startswith("# ") and f"mlx_qlora train -c recipes/{path.name}" in first  # how to run it


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_keys_are_commented(path):
    """Every setting given a value on its line says what it is (section headers excepted)."""
    bare = [ln for ln in path.read_text().splitlines()
            if re.match(r"^\s*[\w.]+:\s*[^\s#]", ln) and " # " not in ln]
    assert not bare, f"{path.name}: settings without a comment: {bare}"


def test_sweep_and_8b_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2-sweep.yaml", "llama3-8b-qlora.yaml"} <= names
    cfg = load_config(Path(RECIPES[0]).parent / "llama3-8b-qlora.yaml")
    assert cfg.grad_checkpoint and cfg.batch_size == 1 and cfg.optim.grad_accum > 1


def test_smollm2_recipe_is_the_benchmark_workload():
    cfg = load_config(Path(RECIPES[0]).parent / "smollm2-wikisql.yaml")
    assert (cfg.batch_size, cfg.lora.rank, cfg.lora.targets, cfg.lora.layers) == (4, 8, "all-linear", "last 16")


def test_flags_override_yaml_override_defaults(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: m\nsteps: 50\nlora:\n  rank: 4\n  alpha: 8\ndata:\n  train: d.jsonl\n")
    cfg = load_config(r, ["--lora.rank", "16", "--lr=3e-4", "--grad-checkpoint", "--targets", "q_proj,v_proj",
                          "--layers", "last 4", "--no-progress", "--max_grad_norm", "null"])
    assert cfg.steps == 50 and cfg.lora.rank == 16 and cfg.lora.alpha == 8 and cfg.optim.learning_rate == 3e-4
    assert cfg.grad_checkpoint is True and cfg.progress is False and cfg.optim.max_grad_norm is None
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.layers == "last 4"
    assert cfg.batch_size == 4 and cfg.optim.schedule == "cosine"   # defaults


@pytest.mark.parametrize("args,message", [
    (["--lora.rank", "0"], r"lora.rank=0: use a positive integer"),
    (["--rank", "eight"], r"--lora.rank 'eight': expected int"),
    (["--lora.dropout", "1.5"], r"lora.dropout=1.5: use a value in \[0, 1\)"),
    (["--schedule", "exp"], r"optim.schedule='exp': use one of cosine, linear, constant"),
    (["--lr", "5"], r"learning_rate=5.0: use a small positive number"),
    (["--warmup-steps", "200"], r"warmup_steps=200 is not below steps=100"),
    (["--layers", "0-x"], r"lora.layers='0-x': use 'all'"),
    (["--format", "csv"], r"data.format='csv': use one of auto, text"),
    (["--stepz", "3"], r"unknown option --stepz; did you mean --steps\?"),
    (["--steps"], r"--steps needs a value"),
    (["extra"], r"unexpected argument 'extra'"),
])
def test_bad_values_name_the_fix(tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["--model", "m", "--data", "d.jsonl"] + args)


def test_yaml_errors(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: m\nlora:\n  rnak: 3\n")
    with pytest.raises(UserError, match=r"unknown setting lora.rnak; did you mean lora.rank\?"):
        load_config(r)
    r.write_text("model: [m\n")
    with pytest.raises(UserError, match=r"line \d+: not valid YAML"):
        load_config(r)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_layer_specs():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers(2, 4) == [2, 3] and parse_layers("last 3", 4) == [1, 2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3] and parse_layers([3, 1], 4) == [1, 3]
    with pytest.raises(UserError, match=r"indices \[7\] are out of range"):
        parse_layers([7], 4)
    assert LoraConfig(targets="q_proj, v_proj").targets == ["q_proj", "v_proj"]


def test_override_parse_types():
    o = parse_overrides(["--seed", "3", "--lora.layers", "[0, 2]", "--resume"])
    assert o == {"seed": 3, "lora.layers": [0, 2], "resume": True}
