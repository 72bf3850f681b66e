"""Long fuzz run: N mutated real inputs per reader (default 10,000), counts printed.

    nice -n 5 .venv/bin/python bench/fuzz.py [--n 10000] [--targets gguf,safetensors,jsonl]

Targets and mutations: tests/fuzz_targets.py (the suite's tests/test_fuzz.py runs a few hundred).
A crash is any exception other than the project's one-line UserError; a hang is one input over
10 CPU seconds. Crashing inputs are saved under bench/fuzz_crashes/ for replay. Exit status 1 on any crash
or hang. Hypothesis draws the inputs (derandomized: the same N inputs every run).
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mlx_qlora  # noqa: E402,F401  (BLAS before mlx.core)
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz_targets import Targets, mutated, run  # noqa: E402

CRASH_DIR = ROOT / "bench" / "fuzz_crashes"


def _alarm(signum, frame):
    raise TimeoutError


def fuzz(targets: Targets, name: str, n: int) -> Counter:
    fn, seeds = targets.by_name()[name]
    counts, started = Counter(), time.perf_counter()
    signal.signal(signal.SIGPROF, _alarm)

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated(targets.seeds(seeds)))
    def one(data):
        signal.setitimer(signal.ITIMER_PROF, 10)  # CPU seconds: a busy machine is no hang
        try:
            counts[run(fn, data)] += 1
        except TimeoutError:
            counts["hang"] += 1
            _save(name, "hang", data, "over 10 CPU seconds")
        except Exception as e:  # noqa: BLE001  (the crash we are looking for)
            counts["crash"] += 1
            _save(name, "crash", data, traceback.format_exc())
            counts[f"crash:{type(e).__name__}"] += 1
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        done = sum(counts[k] for k in ("ok", "error", "hang", "crash"))
        if done % 1000 == 0:
            print(f"  {name}: {done}/{n} inputs, {time.perf_counter() - started:.0f} s", flush=True)

    one()
    counts["seconds"] = round(time.perf_counter() - started)
    return counts


def _save(name: str, kind: str, data: bytes, why: str) -> None:
    CRASH_DIR.mkdir(exist_ok=True)
    stem = CRASH_DIR / f"{name}-{kind}-{abs(hash(data)):x}"
    stem.with_suffix(".bin").write_bytes(data)
    stem.with_suffix(".txt").write_text(why)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--targets", default="gguf,safetensors,adapter,jsonl")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        targets = Targets(Path(d))
        targets.tokenizer()  # loaded once, outside the per-input time limit
        for name in args.targets.split(","):
            print(f"fuzzing {name} with {args.n} mutated inputs ...", flush=True)
            rows.append((name, fuzz(targets, name, args.n)))
    print("\n| target | inputs | accepted | one-line errors | crashes | hangs | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, c in rows:
        total = c["ok"] + c["error"] + c["crash"] + c["hang"]
        print(f"| {name} | {total} | {c['ok']} | {c['error']} | {c['crash']} | {c['hang']} | {c['seconds']} |")
    bad = sum(c["crash"] + c["hang"] for _, c in rows)
    if bad:
        print(f"{bad} crashing/hanging inputs saved in {CRASH_DIR}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
