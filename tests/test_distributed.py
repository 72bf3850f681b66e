"""Data-parallel training (train/distributed.py, train/launch.py) on a tiny 4-bit llama.

Two local ranks over MLX's ring backend on loopback (``mlx_qlora train --nproc 2``, which runs
``mlx.launch``), one thread each, train the same losses as one process at the same global batch;
a 2-rank resume equals the uninterrupted 2-rank run; a rank killed with SIGKILL ends the command
non-zero with the rank named, and the checkpoint before it loads and resumes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx_qlora  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_qlora.cli import main
from mlx_qlora.train.config import load_config
from mlx_qlora.train.loop import train

ONE_THREAD = {k: "1" for k in ("MLX_QLORA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
# batch 3 over 2 ranks: shares of 2 and 1 rows; 22 rows = 7 full batches + 1 row, so the
# epoch's last batch leaves rank 1 empty (its gradient is zeros) and 10 steps cross an epoch.
# fp32 products: a rank's share gives oneMKL's bf16 GEMMs other shapes, whose fp32-level differences
# flip later bf16 roundings and grow over steps (bf16 vs fp32 training: tests/test_cpu_gemm.py).
SETTINGS = {"steps": 10, "batch_size": 3, "checkpoint_every": 5, "eval_every": 5, "keep_checkpoints": 2,
            "progress": False, "lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 1e-3, "cpu_gemm": "fp32"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Rows of different lengths (so the ranks' shares differ in tokens)."""
    d = tmp_path_factory.mktemp("dist_data")
    rows = [f"row {i}: " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(5 + (i * 5) % 17)) for i in range(26)]
    (d / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:22]))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[22:]))
    return d


def flags(settings: dict) -> list[str]:
    bools = [f"--{k}" if v else f"--no-{k}" for k, v in settings.items() if isinstance(v, bool)]
    return bools + [x for k, v in settings.items() if not isinstance(v, bool) for x in (f"--{k}", str(v))]


def launch(args: list[str], **popen):
    env = dict(os.environ, **ONE_THREAD)
    return subprocess.Popen([sys.executable, "-m", "mlx_qlora.cli", "train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def run_ranks(model, data, out, nproc=2, **kw) -> str:
    p = launch(["--nproc", str(nproc), "-m", str(model), "--data", str(data), "-o", str(out),
                *flags({**SETTINGS, **kw})])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return err


def losses(out: Path, key: str = "train_loss") -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in recs if key in r]


def weights(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def two_rank_cpu(tiny_llama_q4, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_runs") / "two_cpu"
    err = run_ranks(tiny_llama_q4, data_dir, out, cpu_engine=True)
    (out.parent / "two_cpu.log").write_text(err)
    return out


@pytest.mark.parametrize("cpu_engine", [True, False], ids=["cpu_engine", "mlx_autodiff"])
def test_two_ranks_train_the_single_process_losses(tiny_llama_q4, data_dir, tmp_path, two_rank_cpu, cpu_engine):
    extra = {"cpu_engine": cpu_engine} if cpu_engine else {"cpu_engine": False, "optim.grad_accum": 2}
    one = tmp_path / "one"
    train(load_config(None, {"model": str(tiny_llama_q4), "data.train": str(data_dir), "out_dir": str(one),
                             **SETTINGS, **extra}))
    if cpu_engine:
        two = two_rank_cpu
    else:
        two = tmp_path / "two"
        run_ranks(tiny_llama_q4, data_dir, two, **extra)
    a, b = losses(one), losses(two)
    assert [s for s, _ in b] == list(range(1, 11))          # rank 0 alone wrote, once per step
    assert [s for s, _ in a] == [s for s, _ in b]
    diff = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    assert diff <= 1e-4, (a, b)
    assert a[-1][1] < 0.8 * a[0][1]                          # it learned: the comparison is not vacuous
    va, vb = losses(one, "val_loss"), losses(two, "val_loss")
    assert [s for s, _ in vb] == [0, 5, 10] and max(abs(x - y) for (_, x), (_, y) in zip(va, vb)) <= 1e-4
    wa, wb = weights(one / "adapters.safetensors"), weights(two / "adapters.safetensors")
    assert wa.keys() == wb.keys() and max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-4
    if cpu_engine:   # what the user sees: the ranks on the progress line, each rank's tok/s in the summary
        log = (two.parent / "two_cpu.log").read_text()
        assert "data parallel: 2 ranks (ring)" in log and log.count("tok/s on 2 ranks") >= 5, log
        assert "rank 0: " in log and "rank 1: " in log and log.count("training summary") == 1, log
    s = json.loads((two / "summary.json").read_text())
    assert s["ranks"] == 2 and len(s["tok_per_s_per_rank"]) == 2 and min(s["tok_per_s_per_rank"]) > 0
    assert s["tokens"] == json.loads((one / "summary.json").read_text())["tokens"]   # summed over ranks
    assert sorted(p.name for p in (two / "checkpoints").glob("step_*")) == ["step_0000005", "step_0000010"]


def test_resume_under_two_ranks_equals_uninterrupted(tiny_llama_q4, data_dir, tmp_path, two_rank_cpu):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_rank_cpu / "checkpoints" / "step_0000005", out / "checkpoints" / "step_0000005")
    (out / "checkpoints" / "latest").write_text("step_0000005\n")
    run_ranks(tiny_llama_q4, data_dir, out, cpu_engine=True, resume=True)
    wa, wb = weights(two_rank_cpu / "adapters.safetensors"), weights(out / "adapters.safetensors")
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-6
    assert [s for s, _ in losses(out)] == list(range(6, 11))
    assert max(abs(x - y) for (_, x), (_, y) in zip(losses(out), losses(two_rank_cpu)[5:])) <= 1e-6


def _rank_pid(rank: int, marker: str) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"mlx_qlora.cli" in cmd and marker.encode() in cmd:
            return int(pid)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_killed_rank_is_named_and_the_checkpoint_resumes(tiny_llama_q4, data_dir, tmp_path):
    from mlx_lm.utils import load
    from mlx_qlora.train.loop import build_optimizer, load_checkpoint
    from mlx_qlora.train.lora import apply_lora

    out = tmp_path / "killed"
    settings = {**SETTINGS, "steps": 100000, "checkpoint_every": 3, "eval_every": 0}
    p = launch(["--nproc", "2", "-m", str(tiny_llama_q4), "--data", str(data_dir), "-o", str(out), *flags(settings)])
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = _rank_pid(1, str(out))
    assert latest.is_file() and pid is not None, p.communicate(timeout=5)
    os.kill(pid, 9)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1 and elapsed < 30, (p.returncode, elapsed, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2 was killed by SIGKILL") and "--resume" in last, err[-2000:]
    named = last.split("the last checkpoint is ")[1].split(":")[0]
    ck = Path(named)
    assert ck.parent == out / "checkpoints" and latest.read_text().strip() == ck.name
    step = json.loads((ck / "state.json").read_text())["step"]
    assert step >= 3 and step % 3 == 0
    # the checkpoint loads, and --resume continues from it (one process, a few more steps)
    cfg = load_config(None, {"model": str(tiny_llama_q4), "data.train": str(data_dir), "out_dir": str(out), **settings})
    model, _ = load(str(tiny_llama_q4))
    apply_lora(model, cfg.lora)
    assert load_checkpoint(out, model, build_optimizer(cfg.optim, cfg.steps))["step"] == step
    s = train(load_config(None, {**cfg.to_dict(), "steps": step + 2, "resume": True, "eval_batches": 1}))
    assert s["steps"] == step + 2
    assert [r for r, _ in losses(out)][-2:] == [step + 1, step + 2]


def test_nproc_bad_values_are_one_line(tiny_llama_q4, data_dir, tmp_path):
    r = CliRunner().invoke(main, ["train", "--nproc", "0", "-m", str(tiny_llama_q4), "--data", str(data_dir)])
    assert r.exit_code == 2 and r.output.startswith("error: --nproc 0:") and r.output.count("\n") == 1, r.output
    # the recipe is checked before anything is launched
    r = CliRunner().invoke(main, ["train", "--nproc", "2", "-m", str(tiny_llama_q4), "--data", str(data_dir),
                                  "-o", str(tmp_path / "x"), "--batch_size", "0"])
    assert r.exit_code == 2 and r.output.startswith("error: batch_size=0") and not (tmp_path / "x").exists(), r.output


def test_launcher_without_the_console_script(monkeypatch):
    """MLX installed with no `mlx.launch` script on PATH (pip --target + PYTHONPATH, as on a GPU box
    with no registry): the launcher is the function that script calls, run by this interpreter."""
    from mlx_qlora.train import launch

    monkeypatch.setattr(launch, "_console_script", lambda: None)
    cmd = launch._launcher()
    assert cmd[0] == sys.executable
    p = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--backend" in p.stdout, p.stderr[-2000:]
