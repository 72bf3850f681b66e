"""Faults: kill -9, Ctrl-C (SIGINT) and a full disk during training, checkpoint writes, convert and
export leave the last checkpoint and every earlier output loadable, and ``--resume`` continues.

The faults are injected into real ``mlx_qlora`` processes. "During a write" is made exact by a
driver that wraps the writer (``mx.save_safetensors`` / gguf-py's tensor write): on its Nth call
it writes half a file and then dies (SIGKILL to itself), raises KeyboardInterrupt, or fails with
ENOSPC. The others are real signals from outside at a moment the test waits for.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = r'''
import errno, os, signal, sys
import mlx_qlora
import mlx.core as mx

kind, _, nth = os.environ.get("FAULT", "none:0").partition(":")
nth, calls = int(nth or 0), [0]


def fault(path):
    """Half-write ``path``, then the fault."""
    if os.path.exists(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigint":
        raise KeyboardInterrupt
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


real_save = mx.save_safetensors


def save(path, arrays, metadata=None):
    real_save(path, arrays, metadata) if metadata is not None else real_save(path, arrays)
    calls[0] += 1
    if calls[0] == nth:
        fault(path)


mx.save_safetensors = save

import gguf

real_write = gguf.GGUFWriter.write_tensors_to_file


def write_tensors(self, *a, **k):
    real_write(self, *a, **k)
    calls[0] += 1
    if calls[0] == nth:
        self.fout[0].flush() if isinstance(getattr(self, "fout", None), list) else None
        fault(str(self.path) if getattr(self, "path", None) else "")


gguf.GGUFWriter.write_tensors_to_file = write_tensors

import shutil
real_rmtree, removals = shutil.rmtree, [0]


def rmtree(path, *a, **k):
    """kill-rm:N: the Nth directory delete removes one file of it, then the process dies."""
    removals[0] += 1
    if kind == "kill-rm" and removals[0] == nth:
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
        os.unlink(files[0])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)


shutil.rmtree = rmtree
from mlx_qlora.cli import entry
sys.argv = ["mlx_qlora", *sys.argv[1:]]
entry()
'''

ROWS = [f"row {i}: SELECT name FROM t{i % 5} WHERE id = {i}" for i in range(24)]


@pytest.fixture(scope="module")
def q4(tiny_llama_q4):
    return tiny_llama_q4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_data")
    for name, rows in (("train", ROWS), ("valid", ROWS[:4])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return d


def cli(args, fault: str = "none:0", popen: bool = False, cwd=None):
    cmd = [sys.executable, "-c", DRIVER, *map(str, args)]
    env = {**os.environ, "FAULT": fault}
    if popen:
        # SIGINT back to its default in the child: a suite started in the background (`cmd &` in a
        # script, CI) passes SIG_IGN on, Python then installs no KeyboardInterrupt and Ctrl-C tests fail
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def train_args(q4, data, out, steps, *extra):
    return ["train", "--model", q4, "--data", data, "--out", out, "--steps", steps, "--batch_size", 4,
            "--checkpoint_every", 1, "--eval_every", 0, "--eval_batches", 1, "--keep_checkpoints", 3,
            "--lora.rank", 4, "--lr", "1e-3", "--no-progress", *extra]


def assert_loadable(out: Path) -> int:
    """Every checkpoint and the adapter in ``out`` load; returns the step ``latest`` names."""
    import mlx.core as mx

    from mlx_qlora.train.adapter_files import read_adapter

    ck = out / "checkpoints"
    latest = (ck / "latest").read_text().strip()
    steps = sorted(p.name for p in ck.glob("step_*"))
    assert latest in steps, (latest, steps)
    for name in steps:
        d = ck / name
        read_adapter(d)
        assert mx.load(str(d / "optimizer.safetensors"))
        assert json.loads((d / "state.json").read_text())["step"] == int(name.split("_")[1])
    read_adapter(out)  # the adapter other commands use
    return json.loads((ck / latest / "state.json").read_text())["step"]


def resume_finishes(q4, data, out, steps):
    p = cli(train_args(q4, data, out, steps, "--resume"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert assert_loadable(out) == steps
    stale = [f.name for d in (out, out / "checkpoints") for f in d.iterdir() if ".tmp-" in f.name or ".old-" in f.name]
    assert not stale, stale  # what a killed run left half-written is gone


def wait_for(pred, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("timed out")


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


# three mx.save_safetensors calls per checkpoint: its adapter, its optimizer state, the out/ adapter
@pytest.mark.parametrize("nth,what", [(8, "checkpoint 3's optimizer state"), (9, "the adapter beside checkpoint 3")])
def test_kill9_during_a_checkpoint_write(q4, data, tmp_path, nth, what):
    out = tmp_path / "run"
    p = cli(train_args(q4, data, out, 5), f"kill:{nth}")
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    step = assert_loadable(out)
    assert step == (3 if nth == 9 else 2), what  # checkpoint 3 is complete once its `latest` is written
    resume_finishes(q4, data, out, 5)


def test_kill9_while_an_old_checkpoint_is_deleted(q4, data, tmp_path):
    """keep_checkpoints 3: checkpoint 4 prunes checkpoint 1; a kill -9 halfway through that delete
    leaves checkpoints 2-4 loadable and no half-deleted step_* directory (it was renamed to a
    hidden name first, which the resumed run removes)."""
    out = tmp_path / "run"
    p = cli(train_args(q4, data, out, 6), "kill-rm:1")
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert assert_loadable(out) == 4
    assert sorted(x.name for x in (out / "checkpoints").glob("step_*")) == [f"step_000000{i}" for i in (2, 3, 4)]
    resume_finishes(q4, data, out, 6)
    assert not list((out / "checkpoints").glob(".*"))


def test_kill9_from_outside_during_training(q4, data, tmp_path):
    out = tmp_path / "run"
    proc = cli(train_args(q4, data, out, 400), popen=True)
    wait_for(lambda: latest_step(out) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    step = assert_loadable(out)
    assert step >= 3
    resume_finishes(q4, data, out, step + 2)


def test_sigint_from_outside_saves_and_resumes(q4, data, tmp_path):
    out = tmp_path / "run"
    proc = cli(train_args(q4, data, out, 400), popen=True)
    wait_for(lambda: latest_step(out) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text
    assert "interrupted at step" in text and "--resume" in text and "Traceback" not in text
    step = assert_loadable(out)
    assert step >= 2
    resume_finishes(q4, data, out, step + 2)


def test_sigint_during_a_checkpoint_write(q4, data, tmp_path):
    """Ctrl-C inside checkpoint 2's optimizer write: that temp is dropped, the handler saves
    checkpoint 2 whole, and nothing half-written is left."""
    out = tmp_path / "run"
    p = cli(train_args(q4, data, out, 5), "sigint:5")
    assert p.returncode == 130, p.stdout + p.stderr
    assert assert_loadable(out) == 2
    assert not [f for f in out.rglob(".*tmp-*")], list(out.rglob(".*tmp-*"))
    resume_finishes(q4, data, out, 4)


def test_full_disk_during_a_checkpoint(q4, data, tmp_path):
    out = tmp_path / "run"
    p = cli(train_args(q4, data, out, 5), "enospc:5")
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("error: ")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "cannot write" in lines[0] and "free space" in lines[0]
    assert assert_loadable(out) == 1
    assert not [f for f in out.rglob(".*tmp-*")]
    resume_finishes(q4, data, out, 3)


@pytest.fixture(scope="module")
def earlier(q4, tiny_hf_llama, tmp_path_factory) -> dict:
    """A finished convert and export output, copied into each test as the output to replace."""
    d = tmp_path_factory.mktemp("earlier")
    runs = {"convert": ["convert", tiny_hf_llama, "-o", d / "model", "--q-group-size", 32],
            "export": ["export", q4, "-o", d / "m.gguf", "--no-modelfile"]}
    for args in runs.values():
        p = cli(args)
        assert p.returncode == 0, p.stdout + p.stderr
    return {"convert": d / "model", "export": d / "m.gguf", "args": runs}


@pytest.mark.parametrize("command,fault,code", [("convert", "kill:1", -signal.SIGKILL), ("convert", "sigint:1", 130),
                                                ("export", "kill:1", -signal.SIGKILL), ("export", "enospc:1", 2)])
def test_convert_and_export_faults_keep_the_earlier_output(earlier, tmp_path, command, fault, code):
    """A fault while replacing an output (--force) leaves the earlier output byte for byte."""
    import shutil

    src = earlier[command]
    out = tmp_path / src.name
    shutil.copytree(src, out) if src.is_dir() else shutil.copy2(src, out)
    args = [str(a).replace(str(src), str(out)) for a in earlier["args"][command]]
    files = sorted(out.rglob("*")) if out.is_dir() else [out]
    before = {f: f.read_bytes() for f in files if f.is_file()}
    p = cli([*args, "--force"], fault)
    assert p.returncode == code, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    after = {f: f.read_bytes() for f in (sorted(out.rglob("*")) if out.is_dir() else [out]) if f.is_file()}
    assert after == before
    if command == "convert":
        from mlx_qlora.model.model_io import load

        load(out)
    else:
        from mlx_qlora.model.convert.gguf import read_gguf

        read_gguf(out)
    leftovers = [f.name for f in tmp_path.iterdir() if ".tmp-" in f.name]
    assert not leftovers or fault.startswith("kill"), leftovers  # only kill -9 can leave a hidden temp
