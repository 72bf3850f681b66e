"""What a training run shows and leaves behind: progress bar, summary, metrics.jsonl, loss_curve.png.

Memory is reported two ways: peak RSS of the process (what the OS sees, includes Python and
the tokenizer) and MLX's peak allocation (arrays only). Units: GiB, tokens per second.
Throughput counts training steps only: validation passes and start-up (model load, data,
checkpoints) are timed apart, so tok/s matches ``bench/train_throughput.py`` for the same work.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

GIB = 1024 ** 3
PREF_PLOTTED = ("reward_margin", "reward_accuracy")   # preference runs: the PNG's second panel


def _pref_info(extra: dict | None) -> str:
    """`` margin 0.123 acc 0.75`` for a preference step's numbers, else nothing."""
    if not extra or "reward_margin" not in extra:
        return ""
    return f"  margin {extra['reward_margin']:.3f} acc {extra['reward_accuracy']:.2f}"


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / GIB if sys.platform == "darwin" else r * 1024 / GIB


def peak_mlx_gib() -> float:
    return mx.get_peak_memory() / GIB


class Reporter:
    """Collects per-step numbers, draws the bar, writes metrics.jsonl and the final artefacts."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 console: Console | None = None, started: float | None = None, ranks: int = 1,
                 write: bool = True):
        self.out = Path(out_dir)
        self.ranks = ranks         # data-parallel ranks; tokens passed to step() are their sum
        self.write = write         # False on ranks other than 0: count, print and write nothing
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.total, self.start_step = total_steps, start_step
        self.metrics_path = self.out / "metrics.jsonl"
        self._keep_metrics_before(start_step)
        self.t0 = time.perf_counter() if started is None else started  # perf_counter() at start-up
        self.tokens = 0            # real (non-pad) tokens processed in this session
        self.train_s = 0.0         # seconds inside training steps (this session)
        self.valid_s = 0.0         # seconds inside validation passes
        self.train_curve: list[tuple[int, float]] = []
        self.valid_curve: list[tuple[int, float]] = []
        self.pref_curves: dict[str, list[tuple[int, float]]] = {}   # "reward_margin", "val_reward_accuracy", ...
        self.last_extra: dict[str, float] = {}   # the latest of each (val_)reward metric, for the summary
        self._load_curves()
        self.last_train = self.last_valid = self.first_valid = None
        self.live = progress and write and self.console.is_terminal
        self.log_every = max(1, (total_steps - start_step) // 20)
        self.bar = None
        if self.live:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def _keep_metrics_before(self, step: int) -> None:
        """On resume, drop metrics of steps after the checkpoint (they will be redone)."""
        if not self.write or not self.metrics_path.exists():
            return
        if step == 0:
            self.metrics_path.unlink()
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def _load_curves(self) -> None:
        if not self.metrics_path.exists():
            return
        for ln in self.metrics_path.read_text().splitlines():
            rec = json.loads(ln)
            if "train_loss" in rec:
                self.train_curve.append((rec["step"], rec["train_loss"]))
            if "val_loss" in rec:
                self.valid_curve.append((rec["step"], rec["val_loss"]))
            for k in PREF_PLOTTED:
                for key in (k, "val_" + k):
                    if key in rec:
                        self.pref_curves.setdefault(key, []).append((rec["step"], rec[key]))

    def _write(self, rec: dict) -> None:
        if not self.write:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _extra(self, step: int, extra: dict | None, prefix: str) -> None:
        if extra:
            self.last_extra.update({prefix + k: v for k, v in extra.items()})
        for k in PREF_PLOTTED:
            if extra and k in extra:
                self.pref_curves.setdefault(prefix + k, []).append((step, extra[k]))

    def print(self, msg: str) -> None:
        if self.write:
            self.console.print(msg, highlight=False)

    @property
    def tok_per_s(self) -> float:
        """Real tokens per second of training steps (validation and start-up excluded)."""
        return self.tokens / self.train_s if self.train_s > 0 else 0.0

    def step(self, step: int, loss: float, tokens: int, lr: float, seconds: float, extra: dict | None = None) -> None:
        """One optimizer step done: ``tokens`` real tokens in ``seconds`` (the step alone);
        ``extra``: further per-step numbers (preference rewards, margin, accuracy)."""
        self.tokens += tokens
        self.train_s += seconds
        self.last_train = loss
        self.train_curve.append((step, loss))
        rec = {"step": step, "train_loss": round(loss, 6), "lr": lr, "tokens": self.tokens,
               "step_s": round(seconds, 4), "tok_per_s": round(self.tok_per_s, 2),
               "peak_rss_gib": round(peak_rss_gib(), 3),
               "peak_mlx_gib": round(peak_mlx_gib(), 3)}
        rec.update({k: round(v, 6) for k, v in (extra or {}).items()})
        self._write(rec)
        self._extra(step, extra, "")
        ranks = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        info = f"loss {loss:.3f}{_pref_info(extra)}  {self.tok_per_s:,.0f} tok/s{ranks}  mem {peak_rss_gib():.2f} GiB"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.total:
            self.print(f"step {step}/{self.total}  {info}  lr {lr:.2e}")

    def valid(self, step: int, loss: float, seconds: float, extra: dict | None = None) -> None:
        """A validation pass done in ``seconds`` (kept out of the training tok/s)."""
        if self.first_valid is None:
            self.first_valid = loss
        self.last_valid = loss
        self.valid_s += seconds
        self.valid_curve.append((step, loss))
        self._write({"step": step, "val_loss": round(loss, 6), "valid_s": round(seconds, 3),
                     **{"val_" + k: round(v, 6) for k, v in (extra or {}).items()}})
        self._extra(step, extra, "val_")
        self.print(f"step {step}: valid loss {loss:.4f}{_pref_info(extra)} ({seconds:.1f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def summary(self, adapter_path: Path, per_rank: list[float] | None = None) -> dict:
        """The run's numbers (printed as a table and plotted on rank 0); ``per_rank``: each rank's
        own tok/s when data-parallel."""
        self.close()
        size = Path(adapter_path).stat().st_size if Path(adapter_path).is_file() else 0
        total = time.perf_counter() - self.t0
        out = {"tokens": self.tokens, "seconds": round(total, 2), "train_seconds": round(self.train_s, 2),
               "valid_seconds": round(self.valid_s, 2),
               "other_seconds": round(max(total - self.train_s - self.valid_s, 0.0), 2),
               "tok_per_s": round(self.tok_per_s, 2), "peak_rss_gib": round(peak_rss_gib(), 3),
               "peak_mlx_gib": round(peak_mlx_gib(), 3), "train_loss": self.last_train,
               "val_loss_start": self.first_valid, "val_loss": self.last_valid, "adapter_bytes": size}
        if per_rank:
            out.update(ranks=len(per_rank), tok_per_s_per_rank=[round(x, 2) for x in per_rank])
        out.update({k: round(v, 6) for k, v in self.last_extra.items()})
        if not self.write:
            return out
        t = Table(title="training summary", show_header=False)
        t.add_row("tokens", f"{self.tokens:,}")
        t.add_row("throughput", f"{out['tok_per_s']:,.1f} tok/s over {out['train_seconds']:.1f} s of training steps")
        if per_rank:
            t.add_row(f"{len(per_rank)} ranks", ", ".join(f"rank {r}: {x:,.1f}" for r, x in enumerate(per_rank))
                      + f" tok/s (total {out['tok_per_s']:,.1f})")
        t.add_row("wall time", f"{out['seconds']:.1f} s: steps {out['train_seconds']:.1f}, validation "
                               f"{out['valid_seconds']:.1f}, start-up and checkpoints {out['other_seconds']:.1f}")
        t.add_row("peak memory", f"RSS {out['peak_rss_gib']:.2f} GiB, MLX {out['peak_mlx_gib']:.2f} GiB")
        if self.last_train is not None:
            t.add_row("final train loss", f"{self.last_train:.4f}")
        if self.last_valid is not None:
            start = f" (from {self.first_valid:.4f})" if self.first_valid is not None else ""
            t.add_row("final valid loss", f"{self.last_valid:.4f}{start}")
        if "val_reward_margin" in self.last_extra:
            t.add_row("final valid rewards", f"margin {self.last_extra['val_reward_margin']:.4f}, accuracy "
                                             f"{self.last_extra['val_reward_accuracy']:.3f}")
        t.add_row("adapter", f"{adapter_path} ({size / 1024 ** 2:.2f} MiB)")
        self.console.print(t)
        self.plot()
        return out

    def plot(self) -> Path | None:
        """loss_curve.png: train loss per step and valid loss at each evaluation."""
        if not self.train_curve and not self.valid_curve:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.pref_curves:
            fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
            for key, curve in sorted(self.pref_curves.items()):
                style = "o-" if key.startswith("val_") else "-"
                ax2.plot(*zip(*curve), style, label=key.replace("_", " "), lw=1)
            ax2.set_ylabel("reward margin (nats x beta) / accuracy")
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=8)
        else:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if self.train_curve:
            ax.plot(*zip(*self.train_curve), label="train", lw=1)
        if self.valid_curve:
            ax.plot(*zip(*self.valid_curve), "o-", label="valid")
        (ax2 if self.pref_curves else ax).set_xlabel("step")
        ax.set_ylabel("loss (nats / pair)" if self.pref_curves else "loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
