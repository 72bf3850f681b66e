"""The bad-input table of docs/reliability.md, from tests/test_bad_inputs.py itself.

    .venv/bin/python bench/bad_inputs_table.py > /tmp/table.md

Runs the parametrized bad-input cases with MLX_QLORA_BAD_INPUT_LOG set (each case appends its
command and the one line it printed) and prints them as a markdown table. Exit status: pytest's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "lines.jsonl"
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_bad_inputs.py::test_bad_input"], cwd=ROOT,
                           env={**os.environ, "MLX_QLORA_BAD_INPUT_LOG": str(log)}, capture_output=True, text=True)
        rows = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    print("| # | bad input | command | the line printed (exit 2) |")
    print("|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        line = r["line"].replace("|", "\\|")
        print(f"| {i} | {r['case']} | `{r['command']}` | {line} |")
    print(f"\n{len(rows)} cases; pytest: {p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]}")
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
