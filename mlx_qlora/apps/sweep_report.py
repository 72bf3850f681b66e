"""What a sweep leaves behind: results.md / results.csv (one row per trial), results.png, best.yaml.

The Markdown table is sorted by validation loss (best first); the CSV keeps trial order and every
number unrounded. ``best.yaml`` is the base recipe with the best trial's settings: a ready recipe
whose steps and schedule are the base recipe's (the trials ran the sweep's short overrides).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..atomic import atomic_file
from .sweep_config import BASE_BITS, SweepConfig

# Numbers a trial reports (from the training summary); stored on the Optuna trial.
RESULT_KEYS = ("val_loss", "val_loss_start", "task_metric", "tok_per_s", "peak_rss_gib", "trainable", "adapter_bytes",
               "wall_s")
MIB = 1024 ** 2


@dataclass
class Row:
    number: int
    values: dict = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    dir: str = ""
    val_loss: float | None = None
    val_loss_start: float | None = None
    task_metric: float | None = None        # exact match / pair F1 of `mlx_qlora eval --task`, 0-1
    tok_per_s: float | None = None
    peak_rss_gib: float | None = None
    trainable: int | None = None
    adapter_bytes: int | None = None
    wall_s: float | None = None

    def line(self) -> str:
        """The numbers of one finished trial, for its progress line."""
        task = f"task {100 * self.task_metric:.1f}%, " if self.task_metric is not None else ""
        return (f"valid {self.val_loss:.4f} (from {self.val_loss_start:.4f}), {task}{self.tok_per_s:,.0f} tok/s, "
                f"RSS {self.peak_rss_gib:.2f} GiB, {self.trainable:,} trainable, "
                f"{self.adapter_bytes / MIB:.2f} MiB, {self.wall_s:.0f} s")


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def by_task(cfg: SweepConfig) -> bool:
    """Whether trials are ranked by the task metric (``task.select``) rather than valid loss."""
    return cfg.task is not None and cfg.task.select


def ranked(cfg: SweepConfig, rows: list[Row]) -> list[Row]:
    """Finished trials, best first: highest task metric with ``task.select``, else lowest valid loss."""
    ok = [r for r in rows if r.ok]
    return sorted(ok, key=(lambda r: -r.task_metric) if by_task(cfg) else (lambda r: r.val_loss))


def score_text(cfg: SweepConfig, r: Row) -> str:
    if by_task(cfg):
        return f"{cfg.task.metric.replace('_', ' ')} {100 * r.task_metric:.1f}%"
    return f"valid loss {r.val_loss:.4f}"


def markdown(cfg: SweepConfig, rows: list[Row]) -> str:
    keys = [p.key for p in cfg.params]
    task = [f"{cfg.task.metric.replace('_', ' ')} %"] if cfg.task else []
    head = (["", "trial"] + [_short(k) for k in keys] + ["valid loss"] + task
            + ["tok/s", "peak RSS GiB", "trainable", "adapter MiB", "time s"])
    ok = ranked(cfg, rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(ok):
        lines.append("| " + " | ".join(
            ["best" if i == 0 else str(i + 1), f"#{r.number}"] + [cell(r.values.get(k)) for k in keys]
            + [f"{r.val_loss:.4f}"] + ([f"{100 * r.task_metric:.1f}"] if task else [])
            + [f"{r.tok_per_s:,.0f}", f"{r.peak_rss_gib:.2f}", f"{r.trainable:,}",
               f"{r.adapter_bytes / MIB:.2f}", f"{r.wall_s:.0f}"]) + " |")
    for r in rows:
        if not r.ok:
            lines.append("| failed | " + " | ".join([f"#{r.number}"] + [cell(r.values.get(k)) for k in keys])
                         + f" | {r.error} |" + " |" * (len(head) - len(keys) - 3))
    start = {r.val_loss_start for r in ok}
    note = (f"valid loss of the untrained base: {', '.join(f'{v:.4f}' for v in sorted(start))}" if start else "")
    over = ", ".join(f"{k}={cell(v)}" for k, v in cfg.train.items()) or "none"
    return (f"Sweep of {cfg.recipe} ({cfg.sampler} sampler, {len(ok)} of {cfg.trials} trials finished; "
            f"trial overrides: {over}). {note}\n\n" + "\n".join(lines) + "\n")


def write_csv(cfg: SweepConfig, rows: list[Row]) -> str:
    keys = [p.key for p in cfg.params]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial"] + keys + ["state"] + list(RESULT_KEYS) + ["error"])
    for r in rows:
        w.writerow([r.number] + [cell(r.values.get(k)) if isinstance(r.values.get(k), list) else r.values.get(k)
                                 for k in keys]
                   + ["complete" if r.ok else "failed"] + [getattr(r, k) for k in RESULT_KEYS] + [r.error or ""])
    return buf.getvalue()


def plot(cfg: SweepConfig, rows: list[Row], path: Path) -> None:
    """Left: valid loss per trial (best highlighted). Right: valid loss against trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    if ok:
        best = ranked(cfg, ok)[0]
        a.bar([f"#{r.number}" for r in ok], [r.val_loss for r in ok],
              color=["tab:orange" if r is best else "tab:blue" for r in ok])
        lo, hi = min(r.val_loss for r in ok), max(r.val_loss for r in ok)
        a.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        b.scatter([r.trainable for r in ok], [r.val_loss for r in ok], c=[r.tok_per_s for r in ok], cmap="viridis")
        for r in ok:
            b.annotate(f"#{r.number}", (r.trainable, r.val_loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
        b.set_xscale("log")
    a.set_xlabel(f"trial (orange: best by {'task metric' if by_task(cfg) else 'valid loss'})")
    a.set_ylabel("valid loss (nats / token)")
    b.set_xlabel("trainable parameters (colour: tok/s)")
    b.set_ylabel("valid loss (nats / token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep of {Path(cfg.recipe).name}: {len(ok)} trials")
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def best_recipe(cfg: SweepConfig, best: Row, out: Path, model: str | None) -> str:
    """The base recipe with the best trial's settings, as YAML text that starts with how to run it."""
    raw = yaml.safe_load(Path(cfg.recipe).read_text()) or {}
    for key, value in best.values.items():
        if key == BASE_BITS:
            continue
        head, _, tail = key.partition(".")
        if tail:
            raw.setdefault(head, {})[tail] = value
        else:
            raw[key] = value
    if model is not None:
        raw["model"] = model
    raw["out_dir"] = f"adapters/{out.name}-best"
    settings = ", ".join(f"{k}={cell(v)}" for k, v in best.values.items())
    over = ", ".join(f"{k}={cell(v)}" for k, v in cfg.train.items()) or "none"
    header = [f"# mlx_qlora train -c {out / 'best.yaml'}",
              f"# The best setting of sweep {cfg.path or out} (trial #{best.number}, {score_text(cfg, best)}):",
              f"#   {settings}",
              f"# on the base recipe {cfg.recipe}; its steps and schedule are kept (the trials ran with {over}).",
              "# out_dir is new, so the base recipe's adapters stay as they are."]
    return "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False)


def write_report(out: Path, cfg: SweepConfig, rows: list[Row]) -> dict:
    """Rewrite results.md, results.csv, results.png and best.yaml from ``rows``; their paths."""
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png",
             "best": out / "best.yaml"}
    with atomic_file(paths["md"], force=True) as tmp:
        tmp.write_text(markdown(cfg, rows))
    with atomic_file(paths["csv"], force=True) as tmp:
        tmp.write_text(write_csv(cfg, rows))
    plot(cfg, rows, paths["png"])
    ok = ranked(cfg, rows)
    if ok:
        best = ok[0]
        model = str(cfg.base_path(best.values[BASE_BITS])) if BASE_BITS in best.values else None
        with atomic_file(paths["best"], force=True) as tmp:
            tmp.write_text(best_recipe(cfg, best, out, model))
    return paths
