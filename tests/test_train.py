"""The training loop on a tiny 4-bit llama: loss falls, resume is exact, NaN and Ctrl-C are handled."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx_qlora  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_qlora.train import loop as train_mod
from mlx_qlora.cli import main
from mlx_qlora.errors import UserError
from mlx_qlora.train.lora import load_adapter, read_adapter_config
from mlx_qlora.train.loop import train
from mlx_qlora.train.config import load_config
from tolerance import tol

WIKI_ROWS = [
    "table: 1-10015132-11\\ncolumns: Player, No., Nationality, Position\\nQ: What position does the player who played for butler cc (ks) play?\\nA: SELECT Position FROM 1-10015132-11 WHERE School/Club Team = 'Butler CC (KS)'",
    "table: 1-10015132-11\\ncolumns: Player, No., Nationality, Position\\nQ: How many schools did player number 3 play at?\\nA: SELECT COUNT School/Club Team FROM 1-10015132-11 WHERE No. = '3'",
    "table: 1-10015132-11\\ncolumns: Player, No., Nationality, Position\\nQ: What school did player number 21 play for?\\nA: SELECT School/Club Team FROM 1-10015132-11 WHERE No. = '21'",
    "table: 1-10015132-11\\ncolumns: Player, No., Nationality, Position\\nQ: Who is the player that wears number 42?\\nA: SELECT Player FROM 1-10015132-11 WHERE No. = '42'",
]


@pytest.fixture(scope="module")
def tiny_q4(tiny_hf_llama, tmp_path_factory) -> Path:
    """The tiny llama as a 4-bit (group 32) MLX model directory."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q4") / "model"
    convert(str(tiny_hf_llama), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = [WIKI_ROWS[i % 4] for i in range(24)]
    (d / "train.jsonl").write_text("".join(json.dumps({"text": json.loads(f'"{r}"')}) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": json.loads(f'"{r}"')}) + "\n" for r in WIKI_ROWS))
    return d


def cfg(model, data, out, **kw):
    base = {"model": str(model), "out_dir": str(out), "steps": 6, "batch_size": 4, "progress": False,
            "checkpoint_every": 3, "eval_every": 3, "data.train": str(data),
            "lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 1e-3}
    base.update(kw)
    return load_config(None, base)


def weights(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("cpu_engine", [True, False])
def test_loss_falls_and_artifacts(tiny_q4, data_dir, tmp_path, cpu_engine):
    out = tmp_path / "run"
    s = train(cfg(tiny_q4, data_dir, out, steps=30, eval_every=10, checkpoint_every=10, cpu_engine=cpu_engine,
                  **{"optim.learning_rate": 1e-2, "optim.warmup_steps": 3}))
    assert s["val_loss"] < 0.7 * s["val_loss_start"], s
    assert s["trainable"] == 2 * 4 * 1024 and s["steps"] == 30 and s["tokens"] > 0
    assert s["adapter_bytes"] == (out / "adapters.safetensors").stat().st_size > 4 * s["trainable"]
    for f in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss_curve.png", "summary.json"):
        assert (out / f).is_file(), f
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_loss" in r] == list(range(1, 31))
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 10, 20, 30]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000020", "step_0000030"]
    conf = read_adapter_config(out)
    assert conf["base_model"] == str(tiny_q4) and conf["rank"] == 4 and conf["alpha"] == 8.0
    from mlx_lm.utils import load
    model, _ = load(str(tiny_q4))
    load_adapter(model, out)   # the directory alone is enough


@pytest.mark.parametrize("accum,dropout,engine", [(1, 0.0, "cpu"), (2, 0.1, "cpu"), (2, 0.1, "mlx"), (1, 0.1, "gpu")])
def test_resume_matches_uninterrupted_run(tiny_q4, data_dir, tmp_path, monkeypatch, accum, dropout, engine):
    """2N steps in one run == N steps, then --resume for N more (data position, optimizer, RNG),
    on the CPU engine, on MLX autodiff and on the GPU path (CPU kernels off; one micro-batch: the
    whole-step graph, whose AdamW state comes from the checkpoint)."""
    if engine == "gpu":
        from mlx_qlora.train.engines import mlx_cpu_kernels

        monkeypatch.setattr(mlx_cpu_kernels, "_ENABLED", [False])
    kw = {"optim.schedule": "constant", "optim.warmup_steps": 2, "optim.grad_accum": accum,
          "cpu_engine": engine == "cpu", "lora.dropout": dropout, "batch_size": 3, "eval_every": 0,
          "checkpoint_every": 0}
    train(cfg(tiny_q4, data_dir, tmp_path / "full", steps=8, **kw))
    train(cfg(tiny_q4, data_dir, tmp_path / "half", steps=4, **kw))
    s = train(cfg(tiny_q4, data_dir, tmp_path / "half", steps=8, resume=True, **kw))
    assert s["steps"] == 8
    a, b = weights(tmp_path / "full" / "adapters.safetensors"), weights(tmp_path / "half" / "adapters.safetensors")
    assert set(a) == set(b)
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    # and the check can fail: a run restarted from scratch for the last 4 steps ends elsewhere
    train(cfg(tiny_q4, data_dir, tmp_path / "other", steps=4, seed=1, **kw))
    c = weights(tmp_path / "other" / "adapters.safetensors")
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-3


def test_nan_stops_and_keeps_last_checkpoint(tiny_q4, data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.make_step_fns

    def poisoned(*args, **kwargs):
        fns = real(*args, **kwargs)

        def nan_from_step_5(b, seed):
            calls["n"] += 1
            loss, grads = fns.grad(b, seed)
            return (loss * float("nan") if calls["n"] >= 5 else loss), grads

        return fns._replace(grad=nan_from_step_5, whole_step=None)   # the per-micro-batch path (GPU too)

    monkeypatch.setattr(train_mod, "make_step_fns", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"loss became nan .* at step 5: training stopped, the last good checkpoint is .*step_0000003"):
        train(cfg(tiny_q4, data_dir, out, steps=8))
    saved = weights(out / "adapters.safetensors")
    ck = weights(out / "checkpoints" / "step_0000003" / "adapters.safetensors")
    assert all(np.array_equal(saved[k], ck[k]) for k in saved)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"


def test_ctrl_c_saves_adapter_then_resume(tiny_q4, data_dir, tmp_path, monkeypatch):
    real_step = train_mod.Reporter.step

    def interrupt(self, step, *a):
        real_step(self, step, *a)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Reporter, "step", interrupt)
    out = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_q4, data_dir, out, checkpoint_every=0))
    assert (out / "adapters.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(train_mod.Reporter, "step", real_step)
    assert train(cfg(tiny_q4, data_dir, out, resume=True))["steps"] == 6


def test_grad_checkpoint_same_result(tiny_q4, data_dir, tmp_path):
    a = train(cfg(tiny_q4, data_dir, tmp_path / "a", steps=2, eval_every=0))
    b = train(cfg(tiny_q4, data_dir, tmp_path / "b", steps=2, eval_every=0, grad_checkpoint=True))
    assert abs(a["train_loss"] - b["train_loss"]) < tol(1e-5) and abs(a["val_loss"] - b["val_loss"]) < tol(1e-5)
    wa, wb = weights(tmp_path / "a" / "adapters.safetensors"), weights(tmp_path / "b" / "adapters.safetensors")
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) < tol(1e-6) and max(np.abs(wa[k]).max() for k in wa) > 0


def test_cli_flags_override_recipe(tiny_q4, data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_q4}\nsteps: 50\nprogress: false\ndata:\n  train: {data_dir}\nlora:\n  rank: 2\n")
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["train", "-c", str(recipe), "-o", str(out), "--steps", "2", "--lora.rank", "3",
                                  "--eval-every", "0", "--lr", "2e-3"])
    assert r.exit_code == 0, r.output
    conf = read_adapter_config(out)
    assert conf["rank"] == 3 and json.loads((out / "summary.json").read_text())["steps"] == 2
    r = CliRunner().invoke(main, ["train", "-c", str(recipe), "--lora.rnk", "3"])
    assert r.exit_code == 2 and "unknown option --lora.rnk; did you mean --lora.rank?" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    r = CliRunner().invoke(main, ["train", "-c", str(recipe), "--data", str(bad), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "bad.jsonl line 2: not valid JSON" in r.output
    shutil.rmtree(out)


def test_train_process_keeps_torch_out():
    """`mlx_qlora train` hides torch from transformers (it would import it: ~0.25 GiB RSS);
    a process that never ran such a command still sees torch when it is installed."""
    import subprocess
    import sys

    probe = ("import importlib.util, sys\n"
             "sys.argv = ['mlx_qlora', {cmd!r}, '--help']\n"
             "from mlx_qlora.cli import entry\n"
             "try:\n    entry()\nexcept SystemExit:\n    pass\n"
             "import transformers.configuration_utils\n"
             "print('TORCH', sys.modules.get('torch') is not None)\n")
    seen = {}
    for cmd in ("train", "convert"):
        out = subprocess.run([sys.executable, "-c", probe.format(cmd=cmd)], capture_output=True, text=True, check=True).stdout
        seen[cmd] = out.split("TORCH")[-1].strip()
    assert seen["train"] == "False"
    import importlib.util
    if importlib.util.find_spec("torch") is not None:
        assert seen["convert"] == "True"


def test_throughput_counts_training_steps_only(tiny_q4, data_dir, tmp_path, monkeypatch):
    """Slow validation passes and a slow start-up must not lower tok/s: the progress line, the
    summary and metrics.jsonl count tokens over the time of training steps alone."""
    import time

    real_eval, real_load = train_mod.evaluate, train_mod.load_base
    monkeypatch.setattr(train_mod, "evaluate", lambda *a: (time.sleep(0.4), real_eval(*a))[1])
    monkeypatch.setattr(train_mod, "load_base", lambda *a: (time.sleep(0.4), real_load(*a))[1])
    out = tmp_path / "tps"
    s = train(cfg(tiny_q4, data_dir, out, steps=4, eval_every=2, checkpoint_every=0))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps, valids = [r for r in recs if "train_loss" in r], [r for r in recs if "val_loss" in r]
    assert len(steps) == 4 and len(valids) == 3 and all(r["valid_s"] >= 0.4 for r in valids)
    step_s = sum(r["step_s"] for r in steps)
    assert s["train_seconds"] == pytest.approx(step_s, abs=0.01)
    assert s["tok_per_s"] == pytest.approx(s["tokens"] / step_s, rel=0.02)
    assert steps[-1]["tok_per_s"] == pytest.approx(steps[-1]["tokens"] / step_s, rel=0.02)
    assert s["valid_seconds"] >= 1.2 and s["other_seconds"] >= 0.4
    assert s["train_seconds"] + s["valid_seconds"] + s["other_seconds"] == pytest.approx(s["seconds"], abs=0.05)
    # the 1.6 s of sleeping (3 validations + start-up) is not in the rate
    assert s["tok_per_s"] >= 0.99 * s["tokens"] / (s["seconds"] - 1.6)
