"""``mlx_qlora train --nproc N``: N local ranks started by ``mlx.launch`` (ring backend on loopback).

The same as typing ``mlx.launch -n N --backend ring --starting-port P -- python -m mlx_qlora.cli
train ...`` with, in addition:

- the recipe is checked once here (a bad value: one line, exit 2, nothing launched);
- each rank gets cores / N threads (NumPy kernels, OpenBLAS/MKL/OpenMP) unless the variables are
  already set; two free consecutive ports are picked;
- ``mlx.launch`` polls its pipes in a busy loop (about half a core here); once the ranks are
  started its threads are niced to 19 so the ranks keep the cores;
- ``mlx.launch`` exits 0 even when a rank died (it only warns ``Node with rank R exited with code
  C``): those lines are read, and a dead rank ends this command with exit 1 and one line naming it.
  Should the launcher not stop the other ranks within ``STOP_GRACE_S`` they are killed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import require

STOP_GRACE_S = 10.0
THREAD_VARS = ("MLX_QLORA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
FOLLOWERS = (3, -signal.SIGTERM)
# What the ranks left behind print once a peer died: replaced by the one line naming the rank.
FOLLOWER_LINE = re.compile(r"^\[ring\] (Socket \d+ was closed|Too many send/recv errors)|"
                           r"^error: rank \d+ of \d+: (the connection to another rank was lost|no answer from the other)")
NODE_LINE = re.compile(r"Node with rank (\d+) (?:was (killed)|exited with code (-?\d+))")


@dataclass
class LaunchConfig:
    nproc: int
    config_path: str | None = None
    args: list[str] = field(default_factory=list)   # train settings, as given after `train`

    def __post_init__(self):
        require(isinstance(self.nproc, int) and 1 <= self.nproc <= 64,
                f"--nproc {self.nproc!r}: use the number of local ranks, e.g. 2 (several machines: "
                f"mlx.launch --hostfile, see README)")


def _free_ports(n: int) -> int:
    """A port P with P .. P+n-1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports on 127.0.0.1")


def _console_script() -> str | None:
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.is_file() else shutil.which("mlx.launch")


def _launcher() -> list[str]:
    found = _console_script()
    if found:
        return [found]
    # MLX installed without its console scripts (pip --target, a PYTHONPATH install): run the
    # function the `mlx.launch` script calls, with this interpreter
    import importlib.util

    require(importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx._distributed_utils.launch")
            is not None, "mlx.launch not found: install MLX >= 0.29 in this environment (pip install mlx)")
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def _children(pid: int) -> list[int]:
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _rank_of(pid: int) -> int | None:
    """MLX_RANK of a local rank process (Linux /proc; None elsewhere)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[9:]) for e in env if e.startswith(b"MLX_RANK=")), None)


def _calm(pid: int, n: int) -> None:
    """Nice mlx.launch's own threads (not the ranks it started) once all N ranks run."""
    deadline = time.monotonic() + 30
    while len(_children(pid)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    tasks = Path(f"/proc/{pid}/task")
    for tid in ([int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:
            pass


def _describe(killed, code) -> str:
    if killed:
        return "was killed"
    code = int(code)
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_local(cfg: LaunchConfig) -> None:
    """Run ``train`` on ``cfg.nproc`` local ranks; exit 1 naming the rank when one dies."""
    from .config import load_config

    train_cfg = load_config(cfg.config_path, list(cfg.args))   # bad input: one line here, not N
    if cfg.nproc == 1:
        from .loop import train
        train(train_cfg)
        return
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    env = [f"{k}={os.environ.get(k, threads)}" for k in THREAD_VARS]
    port = _free_ports(cfg.nproc)
    argv = [*(["-c", cfg.config_path] if cfg.config_path else []), *cfg.args]
    cmd = [*_launcher(), "-n", str(cfg.nproc), "--backend", "ring", "--starting-port", str(port),
           *sum((["--env", e] for e in env), []), "--", sys.executable, "-m", "mlx_qlora.cli", "train", *argv]
    print(f"launching {cfg.nproc} local ranks (ring on 127.0.0.1:{port}, {threads} thread(s) each) with mlx.launch",
          file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    threading.Thread(target=_calm, args=(proc.pid, cfg.nproc), daemon=True).start()
    failed: list[tuple[int, str, bool]] = []   # (rank, how, stopped by the launcher)
    first_failure: list[float] = []

    def read_stderr():
        shown = ""
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            m = NODE_LINE.search(line)
            if m and (m.group(2) or int(m.group(3)) != 0):
                rank, code = int(m.group(1)), m.group(3)
                # exit 3 (peer lost, watchdog) and SIGTERM (from the launcher) follow another rank's failure
                failed.append((rank, _describe(m.group(2), code), code is not None and int(code) in FOLLOWERS))
                first_failure.append(time.monotonic())
                continue
            if FOLLOWER_LINE.search(line) or (line.startswith("error: ") and line == shown):
                continue   # every rank rejects a bad setting alike: one line is enough
            shown = line
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if first_failure and time.monotonic() - first_failure[0] > STOP_GRACE_S:
                os.killpg(proc.pid, signal.SIGKILL)   # the launcher and every local rank
                proc.wait()
    except KeyboardInterrupt:   # Ctrl-C: rank 0 saves a checkpoint and stops; the launcher stops the rest
        ranks = _children(proc.pid)
        for pid in [p for p in ranks if _rank_of(p) == 0] or ranks:
            os.kill(pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    if not failed:
        return
    # The rank that failed first on its own; the others lost it or were stopped by the launcher.
    culprits = [f for f in failed if not f[2]]
    if culprits:
        what = f"rank {culprits[0][0]} of {cfg.nproc} {culprits[0][1]}"
    else:   # only ranks that gave up on their peers: one hung (or the network dropped)
        what = f"a rank stopped answering (rank {failed[0][0]} of {cfg.nproc} gave up waiting, {failed[0][1]})"
    ck = Path(train_cfg.out_dir) / "checkpoints" / "latest"
    last = f"the last checkpoint is {ck.parent / ck.read_text().strip()}" if ck.is_file() else "no checkpoint was written"
    print(f"error: {what}; every rank stopped; {last}: continue with the same "
          f"command and --resume", file=sys.stderr, flush=True)
    raise SystemExit(1)
