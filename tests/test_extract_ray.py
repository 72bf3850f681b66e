"""mlx_qlora extract --ray: on a local Ray cluster (2 workers x 1 thread) the output is byte-identical
to one process; a worker killed mid-run (SIGKILL) and a whole run killed (SIGKILL) lose no row and
duplicate none; bad --ray input is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny

pytest.importorskip("llama_cpp")
pytest.importorskip("ray")
from test_extract import REVIEWS, SMALL, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N, SHARD = 24, 5                 # rows; rows per shard: 5 shards, the last one short
# quiet, lean Ray: no usage report, the C++ core's own log lines kept out of stderr
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_BACKEND_LOG_LEVEL": "fatal",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A Q8_0 tiny model (its logits do not depend on the rows beside it), 24 rows with two bad ones,
    the SMALL schema, and the output of one process (--threads 1) as the reference."""
    d = tmp_path_factory.mktemp("extract_ray")
    gguf = tiny.write_gguf(tiny.write_hf_dir(d / "hf", arch="llama", seed=3), d / "tiny.gguf", "Q8_0")
    rows = [{"i": i, "text": REVIEWS[i % len(REVIEWS)] + f" ({i})"} for i in range(N)]
    rows[6] = '{"i": 6, "text": '               # not JSON: the row gets its own error
    rows[11] = {"i": 11, "body": "no text"}     # no text field
    inp = write_jsonl(d / "in.jsonl", rows)
    schema = write_jsonl(d / "s.json", [SMALL])
    ref = d / "one.jsonl"
    one = cli(gguf, inp, schema, ref)
    assert one.returncode == 0, one.stderr[-2000:]
    return {"gguf": gguf, "input": inp, "schema": schema, "ref": ref, "one": one.stdout}


def cli(gguf, inp, schema, out, *extra, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(argv(gguf, inp, schema, out, *extra), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env or ENV)


def argv(gguf, inp, schema, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mlx_qlora.cli", "extract", str(gguf), "--input", str(inp), "--output", str(out),
            "--schema", str(schema), "--threads", "1", "--no-progress", *map(str, extra)]


def ray_cli(job, out, *extra, env=None) -> subprocess.CompletedProcess:
    p = cli(job["gguf"], job["input"], job["schema"], out, "--ray", "local", "--ray-workers", "2",
            "--shard-rows", SHARD, *extra, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def line(stdout: str, start: str) -> str:
    (hit,) = [s for s in stdout.splitlines() if s.startswith(start)]
    return hit


def kill_leftovers(marker: str) -> None:
    """Processes of ours (their environment holds ``marker``) that outlived a killed run."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_plan_shards_cover_every_row_once_on_fixed_boundaries():
    from mlx_qlora.apps.extract_ray import plan_shards

    assert plan_shards(0, 24, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    assert plan_shards(7, 24, 5) == [(7, 10), (10, 15), (15, 20), (20, 24)]   # a resumed run re-aligns
    assert plan_shards(24, 24, 5) == [] and plan_shards(0, 3, 64) == [(0, 3)]
    for done in range(25):
        cuts = plan_shards(done, 24, 5)
        assert [r for a, b in cuts for r in range(a, b)] == list(range(done, 24))
        assert all(b % 5 == 0 or b == 24 for _, b in cuts)


@pytest.mark.llamacpp
def test_local_cluster_is_byte_identical_to_one_process(job, tmp_path):
    out = tmp_path / "ray.jsonl"
    p = ray_cli(job, out)
    assert out.read_bytes() == job["ref"].read_bytes()
    got = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(got) == N and sum("result" in g for g in got) == N - 2
    assert "line 7: not valid JSON" in got[6]["error"] and "no text in field" in got[11]["error"]
    # the summary counts the whole cluster: the same rows, validity and tokens per row as one process
    for start in ("valid:", "tokens per row:"):
        assert line(p.stdout, start).split(";")[0] == line(job["one"], start).split(";")[0]
    assert f"rows: {N} of {N} in {out} ({N} this run, 0 from an earlier run)" in p.stdout
    assert "ray: 2 workers x 1 threads (local" in p.stdout and "5 shards of up to 5 rows" in p.stdout
    again = ray_cli(job, out)                             # all done: nothing decoded, nothing added
    assert f"({0} this run, {N} from an earlier run)" in again.stdout
    assert out.read_bytes() == job["ref"].read_bytes()


@pytest.mark.llamacpp
def test_killed_worker_and_killed_run_lose_and_repeat_no_row(job, tmp_path):
    # the actor that takes shard 1 dies by SIGKILL (Ray starts another, the shard is redone); then
    # the whole run (driver, its local cluster, the workers) dies by SIGKILL while shard 3 is stuck:
    # the shards before it are on disk, the rerun does the rest, each row once
    killed, stalled, out = tmp_path / "killed", tmp_path / "stalled", tmp_path / "out.jsonl"
    env = {**ENV, "MLX_QLORA_RAY_TEST_HOOK": f"kill:1:{killed},stall:3:{stalled}"}
    proc = subprocess.Popen(argv(job["gguf"], job["input"], job["schema"], out, "--ray", "local", "--ray-workers", 2,
                                 "--shard-rows", SHARD), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and not (stalled.exists() and out.exists()
                                               and out.read_text().count("\n") >= 2 * SHARD):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)                                   # let the driver write whatever else it has
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        time.sleep(1)
        kill_leftovers(str(stalled))
    with pytest.raises(ProcessLookupError):
        os.kill(int(killed.read_text()), 0)               # the worker on shard 1 is really gone
    kept = out.read_text().count("\n")
    # shard 1 was redone by another actor; whole shards only, none past the stuck one
    assert kept in (2 * SHARD, 3 * SHARD), kept
    assert out.read_bytes() == job["ref"].read_bytes()[:len(out.read_bytes())]
    p = ray_cli(job, out)
    assert out.read_bytes() == job["ref"].read_bytes()
    assert f"({N - kept} this run, {kept} from an earlier run)" in p.stdout


@pytest.mark.llamacpp
def test_bad_ray_input_is_one_line_exit_2_and_writes_nothing(job, tmp_path):
    cases = [(["--ray", "127.0.0.1:1"], "--ray 127.0.0.1:1: no Ray head answers there"),
             (["--ray", "127.0.0.1:1"], "ray start --head"),
             (["--ray", "headnode"], "--ray 'headnode': use local, a head's HOST:6379"),
             (["--ray", "local", "--ray-workers", "0"], "--ray-workers 0: use 1 or more"),
             (["--ray", "local", "--shard-rows", "0"], "--shard-rows 0: use 1 or more"),
             (["--ray-workers", "2"], "go with --ray ADDRESS")]
    for extra, message in cases:
        out = tmp_path / "o.jsonl"
        t0 = time.time()
        p = cli(job["gguf"], job["input"], job["schema"], out, *extra, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            p.stderr
        assert not out.exists() and time.time() - t0 < 30
    # a model missing on this machine: one line before the local cluster starts
    p = cli(tmp_path / "gone.gguf", job["input"], job["schema"], tmp_path / "o.jsonl", "--ray", "local")
    assert p.returncode == 2 and p.stderr.strip() == f"error: GGUF file '{tmp_path / 'gone.gguf'}' not found"
    assert not (tmp_path / "o.jsonl").exists()
