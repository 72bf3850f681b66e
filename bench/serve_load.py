"""serve under bounded load from a second process on loopback; prints requests, errors, p50/p99.

    nice -n 5 .venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 8]

A real ``mlx_qlora serve`` subprocess (tiny llama + two adapters, MLX engine) gets a mix of base
and adapter requests, chat and completions, streamed and not, and ~15% malformed ones
(tests/serve_load_driver.py). The anchor, run side by side: the same valid requests sent one
at a time. Exit status 1 when any valid answer differs from its lone answer, any malformed
request lacks a JSON error, or the server died.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mlx_qlora  # noqa: E402,F401

from serve_load_driver import (_http, build_models, expected_answers, request_mix, run_load,  # noqa: E402
                               start_server, stop_server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model, adapters = build_models(Path(d))
        proc, port = start_server(model, adapters)
        try:
            requests = request_mix(args.requests, seed=0)
            expected = expected_answers(port, requests)
            serial = run_load(port, [r for r in requests if r.valid], expected, concurrency=1)
            loaded = run_load(port, requests, expected, concurrency=args.concurrency)
            alive = proc.poll() is None and _http(port, "GET", "/health")[0] == 200
        finally:
            log = stop_server(proc)
    print(f"one at a time (anchor): {serial.line()}")
    print(f"{args.concurrency} concurrent:          {loaded.line()}")
    print(f"p50 ratio loaded/alone: {loaded.pct(0.5) / serial.pct(0.5):.2f}x (one engine: requests queue at its lock)")
    print(f"server alive after the load: {alive}; tracebacks in its log: {log.count('Traceback')}")
    for w in loaded.wrong[:5]:
        print("  wrong:", w)
    print("\n| requests | valid | malformed | errors | p50 ms | p99 ms | server up |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {loaded.requests} | {loaded.valid} | {loaded.malformed} | {len(loaded.wrong)} | {loaded.pct(0.5):.0f} "
          f"| {loaded.pct(0.99):.0f} | {alive} |")
    return 0 if alive and not loaded.wrong and not serial.wrong and "Traceback" not in log else 1


if __name__ == "__main__":
    sys.exit(main())
