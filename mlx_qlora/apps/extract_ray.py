"""``mlx_qlora extract --ray ADDRESS``: the extract job over a Ray cluster with Ray Data.

The driver (this process) reads the rows, cuts the ones not yet in ``--output`` into shards and
maps them with Ray Data through a pool of actors; each actor loads the model once and decodes a
shard with ``extract.decode_rows``, the code path one process uses (llama.cpp's BatchDecoder, with
as many threads as CPUs Ray gave the actor). Results come back to the driver, which appends them in
input order with extract's OrderedWriter (each line fsync'ed), so workers need no shared
filesystem: only the model (and adapter) path must exist on every node, and mlx_qlora be installed.

Resuming: the rerun counts the complete lines in ``--output`` (extract.resume_point) and shards
what is left, on boundaries at multiples of ``--shard-rows`` from row 0, so a job cut anywhere
redoes at most the rest of one shard and no row twice. A worker that dies mid-shard is restarted by
Ray Data and its shard redone from the start (nothing of it was written: a shard's lines travel
together). Ray is imported only here (the ``ray`` extra).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

from ..errors import UserError, require
from . import extract as ex

DEFAULT_SHARD_ROWS = 64
CONNECT_TIMEOUT_S = 5.0               # a head that does not accept TCP by then is not there
# tests only, comma-separated: "kill:SHARD:FLAG" = the actor that takes shard SHARD kills itself with
# SIGKILL, once (FLAG, a file, marks that it happened; Ray restarts the actor and redoes the shard);
# "stall:SHARD:FLAG" = it sleeps there instead (the test then kills the whole run)
TEST_HOOK = "MLX_QLORA_RAY_TEST_HOOK"
ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_address(value: str) -> tuple[str, int] | None:
    """None for ``local`` (start a cluster in this process), else the head's (host, port)."""
    if value == "local":
        return None
    m = ADDRESS.match(value or "")
    require(m is not None and 0 < int(m.group(3)) < 65536,
            f"--ray {value!r}: use local, a head's HOST:6379, or ray://HOST:10001 (Ray Client)")
    return m.group(2).strip("[]"), int(m.group(3))


def check_reachable(value: str, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One line, before Ray is started, when nothing listens at the head's address. Ray itself
    would wait, then end the process with exit 1 from its C++ core."""
    from ray.util import get_node_ip_address

    if host in ("localhost", "127.0.0.1", "::1"):   # Ray dials this node's IP for those, not loopback
        host = get_node_ip_address()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"--ray {value}: no Ray head answers there ({host}:{port}: {e.strerror or e}); start one "
                        f"with `ray start --head`, fix the address, or use --ray local") from None


def plan_shards(done: int, total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges from ``done`` to ``total``, cut at multiples of ``size`` from row 0."""
    cuts = [done, *range((done // size + 1) * size, total, size), total]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


class ShardWorker:
    """A Ray Data actor: loads the model once, then decodes the shards it is given."""

    def __init__(self, cfg: ex.ExtractConfig, answer: ex.Answer, gbnf: str | None):
        import ray

        cfg = copy.copy(cfg)  # not dataclasses.replace: __post_init__ would look for --input on this node
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        cfg.threads = max(1, int(cpus or cfg.threads or 1))   # llama.cpp threads = the CPUs Ray gave us
        cfg.progress = False
        self.session = ex.open_session(cfg, answer, gbnf)

    def __call__(self, batch: dict) -> dict:
        shards, lines, stats = [], [], []
        for shard, payload in zip(batch["shard"], batch["rows"]):
            _test_hook(int(shard))
            rows = [ex.Row(*r) for r in json.loads(payload)]
            tally, got = ex.Tally(), {}
            t0 = time.perf_counter()
            evaluated, counts = ex.decode_rows(self.session, rows, tally, got.__setitem__)
            shards.append(int(shard))
            lines.append(json.dumps(sorted(got.items()), ensure_ascii=False))
            stats.append(json.dumps({"rows": tally.rows, "valid": tally.valid, "tokens_in": tally.tokens_in,
                                     "tokens_out": tally.tokens_out, "decoded": tally.decoded, "evaluated": evaluated,
                                     "counts": counts, "engine": self.session.engine.name, "pid": os.getpid(),
                                     "decode_s": time.perf_counter() - t0}))
        return {"shard": shards, "lines": lines, "stats": stats}

    def __del__(self):
        session = getattr(self, "session", None)
        if session is not None:
            session.engine.close()


def _test_hook(shard: int) -> None:
    for hook in filter(None, os.environ.get(TEST_HOOK, "").split(",")):
        what, at, flag = hook.split(":", 2)
        if int(at) == shard and not Path(flag).exists():
            Path(flag).write_text(str(os.getpid()))
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)


def _init_ray(value: str, target):
    import importlib.util

    import ray

    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if target is None:   # one Ray CPU per core this process may run on
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray.init(num_cpus=cores, include_dashboard=False, **quiet)
        return ray
    require(not value.startswith("ray://") or importlib.util.find_spec("grpc") is not None,
            f"--ray {value}: Ray Client is not installed; pip install 'ray[client]', or run extract on a "
            f"cluster node with --ray HEAD:6379")
    try:
        ray.init(address=value, **quiet)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        raise UserError(f"--ray {value}: could not join the Ray cluster there ({str(e).splitlines()[0]}); "
                        f"check the head's address and port (ray status on the head prints it); a head with "
                        f"token auth also needs RAY_AUTH_MODE=token and its token (ray get-auth-token) here") from None
    return ray


def _user_error_inside(e: BaseException) -> UserError | None:
    """A worker's UserError (say, a model path missing on its node), however Ray wrapped it: as the
    exception itself, or (an actor that died in __init__) only as text in the remote traceback."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e).splitlines()[0])
        m = re.search(r"mlx_qlora\.errors\.UserError: (.+)", str(getattr(e, "error_msg", "") or e))
        if m:
            return UserError(m.group(1).strip())
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def run_extract_ray(cfg: ex.ExtractConfig, address: str, workers: int | None = None,
                    shard_rows: int = DEFAULT_SHARD_ROWS) -> dict:
    """Run the job on the Ray cluster at ``address``; print and return the summary as run_extract."""
    require(workers is None or workers >= 1, f"--ray-workers {workers}: use 1 or more (or leave it out: "
                                             f"the cluster's CPUs / --threads)")
    require(shard_rows >= 1, f"--shard-rows {shard_rows}: use 1 or more rows per shard")
    require(cfg.threads is None or cfg.threads >= 1, f"--threads {cfg.threads}: use 1 or more")
    target = parse_address(address)
    answer, gbnf = ex.prepare_answer(cfg)
    rows = ex.read_rows(cfg.input, cfg.text_field)
    out = Path(cfg.output)
    done = ex.resume_point(out, len(rows))
    price = ex.default_price_per_hour() if cfg.price_per_hour is None else cfg.price_per_hour
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'mlx_qlora[ray]' (or 'ray[data]')") from None
    if target is None:   # the workers run here: a missing model is one line before Ray starts
        from ..infer.engines import EngineConfig, resolve
        resolve(EngineConfig(model=cfg.model, engine=cfg.engine, gguf=cfg.gguf))
    else:
        check_reachable(address, *target)
    if done == len(rows):   # nothing left: no cluster to start
        return ex.summarize(cfg, out, len(rows), done, ex.Tally(), 0.0, price, 0, "llama.cpp", None)
    ray = _init_ray(address, target)
    try:
        return _run(ray, cfg, address, workers, shard_rows, answer, gbnf, rows, out, done, price)
    finally:
        ray.shutdown()


def _run(ray, cfg, address, workers, shard_rows, answer, gbnf, rows, out, done, price) -> dict:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    threads = cfg.threads or 1
    n = workers or max(1, cpus // threads)
    require(n * threads <= cpus, f"--ray-workers {n} x --threads {threads} needs {n * threads} CPUs but the cluster "
                                 f"at {address} has {cpus}; lower --ray-workers or --threads, or add nodes")
    shards = plan_shards(done, len(rows), shard_rows)
    ctx = ray.data.DataContext.get_current()   # (importing ray.data sets up its logging: quiet it after)
    # Ray Data logs its plan and progress at INFO/WARNING; its failures reach us as exceptions
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    items = [{"shard": k, "rows": json.dumps([[r.index, r.data, r.text, r.error] for r in rows[a:b]])}
             for k, (a, b) in enumerate(shards)]
    tally, evaluated, counts, pids, engine, busy = ex.Tally(), 0, None, set(), "llama.cpp", 0.0
    writer = None   # opened with the first result: a job that fails before then writes nothing
    bar, task = ex._progress(cfg.progress, len(rows), done)
    t0 = time.perf_counter()
    try:
        with bar:
            if items:
                ds = ray.data.from_items(items, override_num_blocks=len(items))
                # one shard per actor at a time: none waits behind a slow (or restarting) actor while
                # another is idle; a shard takes seconds, handing over the next one milliseconds
                pool = ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1)
                mapped = ds.map_batches(ShardWorker, batch_size=1, compute=pool,
                                        num_cpus=threads, fn_constructor_kwargs={"cfg": cfg, "answer": answer,
                                                                                 "gbnf": gbnf})
                for got in mapped.iter_rows():
                    writer = writer or ex.OrderedWriter(out, done)
                    for index, line in json.loads(got["lines"]):
                        writer.put(index, line)
                    st = json.loads(got["stats"])
                    for k in ("rows", "valid", "tokens_in", "tokens_out", "decoded"):
                        setattr(tally, k, getattr(tally, k) + st[k])
                    evaluated += st["evaluated"]
                    if st["counts"] is not None:
                        counts = {k: (counts or {}).get(k, 0) + v for k, v in st["counts"].items()}
                    pids.add(st["pid"])
                    busy += st["decode_s"]
                    engine = st["engine"]
                    rate = tally.rows / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, completed=done + writer.written, rate=f"{rate:.2f} rows/s")
    except KeyboardInterrupt:
        kept = out.read_bytes().count(b"\n") if out.exists() else 0
        print(f"interrupted: {kept} of {len(rows)} rows are in {out}; rerun the same command to continue")
        raise SystemExit(130) from None
    except Exception as e:
        user = _user_error_inside(e)
        if user is None:
            raise
        raise user from None
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - t0
    summary = ex.summarize(cfg, out, len(rows), done, tally, elapsed, price, evaluated, engine, counts)
    # busy: seconds the workers spent in decode_rows, summed; the rest of workers x wall clock is
    # actor start-up and model loads, hand-overs, and idle workers at the tail
    print(f"ray: {n} workers x {threads} threads ({address}, {cpus} CPUs), {len(shards)} shards of up to "
          f"{shard_rows} rows; {len(pids)} worker processes answered; decoding {busy:.1f} of "
          f"{n * elapsed:.1f} worker-seconds")
    summary["ray"] = {"workers": n, "threads": threads, "shards": len(shards), "cpus": cpus, "pids": len(pids),
                      "decode_s": busy}
    return summary
