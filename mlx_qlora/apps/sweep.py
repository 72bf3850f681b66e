"""``mlx_qlora sweep``: hyper-parameter search over short QLoRA runs, with Optuna.

Each trial is ``mlx_qlora train`` on the base recipe with the trial's settings, run as a child
process (its own peak RSS, its memory returned between trials) writing into
``out_dir/trials/trial_NNN``. The study lives in ``out_dir/study.db`` (Optuna's SQLite storage):
rerunning the same command resumes it, skipping finished trials. Ctrl-C stops the running trial,
drops its partial directory and keeps every finished one; the next run tries that setting again
first. After every trial the table (Markdown + CSV), the PNG and the best recipe are rewritten.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..atomic import atomic_file
from ..errors import UserError, require
from ..train.config import load_config
from .sweep_config import BASE_BITS, SweepConfig
from .sweep_report import RESULT_KEYS, Row, cell, write_report, by_task, ranked, score_text

STUDY = "sweep"


class TrialFailed(Exception):
    """A trial's training stopped with an error (e.g. a diverging learning rate); the sweep goes on."""


def run_sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep; returns {"best": Row, "rows": [Row], "out_dir": str}."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)   # trials report in our own lines
    out = _open_out_dir(cfg)
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
                                direction="maximize" if by_task(cfg) else "minimize", sampler=_sampler(cfg, optuna, 0))
    if study.trials:   # resumed: a fresh seed stream, or random / TPE would redraw trial 0's setting
        study.sampler = _sampler(cfg, optuna, len(study.trials))
    requeued = _requeue_interrupted(study, out)
    done = _done(study)
    todo = cfg.trials - len(done)
    space = "; ".join(p.describe() for p in cfg.params)
    print(f"sweep {cfg.path or cfg.recipe}: {cfg.sampler} sampler, {cfg.trials} trials over {space}", flush=True)
    if done or requeued:
        print(f"resuming {out}: {len(done)} trial(s) finished, {max(todo, 0)} to run"
              + (f" (retrying {requeued} interrupted first)" if requeued else ""), flush=True)
    t0 = time.perf_counter()

    def objective(trial):
        values = {p.key: p.suggest(trial) for p in cfg.params}
        tdir = out / "trials" / f"trial_{trial.number:03d}"
        trial.set_user_attr("dir", str(tdir.relative_to(out)))
        n = len(_done(study)) + 1
        print(f"trial {n}/{cfg.trials} (#{trial.number}) {_settings(values)}: training ...", flush=True)
        try:
            result = _train_trial(cfg, values, tdir)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            shutil.rmtree(tdir, ignore_errors=True)
            _run_again(study, trial.number)     # the same setting runs first next time
            raise
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            raise
        for k in RESULT_KEYS:
            trial.set_user_attr(k, result.get(k))
        return result["task_metric"] if by_task(cfg) else result["val_loss"]

    def after_trial(study, trial):
        rows = _rows(study, cfg)
        write_report(out, cfg, rows)
        n = len(_done(study))
        if trial.state.name == "COMPLETE":
            row = next(r for r in rows if r.number == trial.number)
            best = ranked(cfg, rows)[0]
            print(f"trial {n}/{cfg.trials} (#{trial.number}) done: {row.line()} | best #{best.number} "
                  f"{score_text(cfg, best)}", flush=True)
        elif not trial.user_attrs.get("interrupted"):
            print(f"trial {n}/{cfg.trials} (#{trial.number}) failed: {trial.user_attrs.get('error')} "
                  f"(logs in {out / trial.user_attrs.get('dir', '')})", flush=True)

    try:
        if todo > 0:
            study.optimize(objective, n_trials=todo, catch=(TrialFailed,), callbacks=[after_trial])
    except KeyboardInterrupt:
        n = len(_done(study))
        write_report(out, cfg, _rows(study, cfg))
        print(f"interrupted: {n} of {cfg.trials} trials finished and kept in {out}; run the same command "
              f"again to resume", file=sys.stderr, flush=True)
        raise
    rows = _rows(study, cfg)
    ok = [r for r in rows if r.ok]
    require(ok, f"no trial finished: see the logs under {out / 'trials'} (the first error: "
                f"{next((r.error for r in rows if r.error), 'none recorded')})")
    paths = write_report(out, cfg, rows)
    best = ranked(cfg, ok)[0]
    print(f"\nsweep done: {len(ok)} finished, {len(rows) - len(ok)} failed, "
          f"{time.perf_counter() - t0:.0f} s this run", flush=True)
    print(paths["md"].read_text(), flush=True)
    print(f"best: trial #{best.number} {score_text(cfg, best)} ({_settings(best.values)})\n"
          f"table {paths['md']}, {paths['csv']}; plot {paths['png']}; best recipe {paths['best']} "
          f"(run: mlx_qlora train -c {paths['best']})", flush=True)
    return {"best": best, "rows": rows, "out_dir": str(out)}


# ---------------------------------------------------------------- study bookkeeping
def _sampler(cfg: SweepConfig, optuna, offset: int):
    """The sampler, seeded with ``seed + offset`` (offset: trials the study already holds). Not the
    grid: its seed fixes the order of its grid ids, which must not change across runs."""
    seed = cfg.seed + offset
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.labels() for p in cfg.params}, seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(cfg.trials // 2, 1)))


def _done(study) -> list:
    """Finished trials: completed, or failed with an error (not interrupted; those run again)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" or (t.state.name == "FAIL" and not t.user_attrs.get("interrupted"))]


def _requeue_interrupted(study, out: Path) -> int:
    """Trials left running by a killed process: failed, their directory dropped, tried again first.
    (A Ctrl-C'd trial re-queues itself in ``objective``.)"""
    from optuna.trial import TrialState

    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        shutil.rmtree(out / t.user_attrs.get("dir", f"trials/trial_{t.number:03d}"), ignore_errors=True)
        if t.params:
            _run_again(study, t.number)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _run_again(study, number: int) -> None:
    """Queue trial ``number``'s setting again. Under the grid sampler the queued trial also takes
    the grid point's id, which GridSampler reads back after the trial (it has none of its own)."""
    storage = study._storage
    old = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    study.enqueue_trial(old.params, skip_if_exists=False)
    attrs = storage.get_trial_system_attrs(old._trial_id)
    if "grid_id" in attrs:
        new = max((t for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING"), key=lambda t: t.number)
        for k in ("grid_id", "search_space"):
            storage.set_trial_system_attr(new._trial_id, k, attrs[k])


def _rows(study, cfg: SweepConfig) -> list[Row]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("interrupted") or t.state.name not in ("COMPLETE", "FAIL"):
            continue
        values = {p.key: p.decode(t.params[p.key]) for p in cfg.params if p.key in t.params}
        rows.append(Row(number=t.number, values=values, ok=t.state.name == "COMPLETE",
                        error=t.user_attrs.get("error"), dir=t.user_attrs.get("dir", ""),
                        **{k: t.user_attrs.get(k) for k in RESULT_KEYS}))
    return rows


def _open_out_dir(cfg: SweepConfig) -> Path:
    """A new directory, or the same study resumed; anything else needs --force."""
    out = Path(cfg.out_dir)
    marker = out / "sweep.json"
    ident = json.loads(json.dumps(cfg.identity()))
    if out.exists() and any(out.iterdir()):
        old = json.loads(marker.read_text()) if marker.is_file() else None
        if old != ident and not cfg.force:
            if old is None:
                raise UserError(f"output {out} already exists and holds no sweep; choose another --out or pass "
                                f"--force to replace it")
            diff = ", ".join(k for k in ident if old.get(k) != ident[k])
            raise UserError(f"output {out} holds a different sweep (its {diff} differ); choose another --out, "
                            f"or pass --force to replace it")
        if old != ident:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        with atomic_file(marker, force=True) as tmp:
            tmp.write_text(json.dumps(ident, indent=2) + "\n")
    return out


def _settings(values: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={cell(v)}" for k, v in values.items())


# ---------------------------------------------------------------- one trial
def trial_config(cfg: SweepConfig, values: dict, tdir: Path, model: str | None = None):
    """The TrainConfig of one trial: recipe < sweep's train overrides < the trial's values."""
    over = {**cfg.train, **{k: v for k, v in values.items() if k != BASE_BITS},
            "out_dir": str(tdir / "adapter"), "progress": False}
    if model is not None:
        over["model"] = model
    return load_config(cfg.recipe, over)


def _train_trial(cfg: SweepConfig, values: dict, tdir: Path) -> dict:
    """Train one trial in a child process; its summary (valid loss, tok/s, peak RSS, ...)."""
    model = base_model(cfg, values[BASE_BITS], tdir) if BASE_BITS in values else None
    tcfg = trial_config(cfg, values, tdir, model)
    tdir.mkdir(parents=True, exist_ok=True)
    recipe = tdir / "recipe.yaml"
    recipe.write_text(f"# mlx_qlora train -c {recipe}\n# trial of sweep {cfg.path or cfg.out_dir}\n"
                      + yaml.safe_dump(tcfg.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    _run_child([sys.executable, "-m", "mlx_qlora.cli", "train", "-c", str(recipe)], tdir / "train.log")
    summary = json.loads((Path(tcfg.out_dir) / "summary.json").read_text())
    if cfg.task is not None:
        summary["task_metric"] = _task_metric(cfg, tcfg, tdir)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


def _task_metric(cfg: SweepConfig, tcfg, tdir: Path) -> float:
    """``mlx_qlora eval --task`` on the trial's adapter; its exact match (or pair F1)."""
    t, res = cfg.task, tdir / "eval.json"
    cmd = [sys.executable, "-m", "mlx_qlora.cli", "eval", tcfg.model, "--adapter", tcfg.out_dir, "--data", t.data,
           "--split", t.split, "--task", t.type, "--max-rows", str(t.max_rows), "--engine", t.engine,
           "--json", str(res)]
    if t.answer_prefix:
        cmd += ["--answer-prefix", t.answer_prefix]
    if t.answer != "json":
        cmd += ["--answer", t.answer]
    _run_child(cmd, tdir / "eval.log")
    value = json.loads(res.read_text()).get(t.metric)
    if not isinstance(value, (int, float)):
        raise TrialFailed(f"mlx_qlora eval wrote no {t.metric} in {res}")
    return float(value)


def base_model(cfg: SweepConfig, bits: int, tdir: Path) -> str:
    """The base converted at ``bits`` (cached: converted once, reused by every trial and sweep)."""
    src, cache = cfg.base.source, cfg.base_path(bits)
    if (cache / "config.json").is_file():
        return str(cache)
    tdir.mkdir(parents=True, exist_ok=True)
    print(f"  converting {src} at {bits} bits, group {cfg.base.group_size} -> {cache} (cached)", flush=True)
    try:
        _run_child([sys.executable, "-m", "mlx_qlora.cli", "convert", src, "-o", str(cache), "--q-bits", str(bits),
                    "--q-group-size", str(cfg.base.group_size), "--requantize"], tdir / "convert.log")
    except TrialFailed as e:
        raise UserError(f"converting base.source {src} at {bits} bits failed: {e}") from None
    return str(cache)


def _run_child(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its output in ``log``; Ctrl-C reaches it and is re-raised here."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        err = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")), None)
        raise TrialFailed(err or f"exit code {rc}: {lines[-1] if lines else 'no output'}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)     # a terminal's Ctrl-C already sent one; a kill -INT did not
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
