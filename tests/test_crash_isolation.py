"""A crash in native code fails one test and the run goes on to its summary (issue #21): the
suite's own pytest configuration (pyproject's addopts: one xdist worker, restarted) applied to a
file whose middle test segfaults, as llama.cpp did on AMX CPUs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CRASHING = '''
import ctypes

def test_before():
    assert 1 + 1 == 2

def test_segfaults():
    ctypes.string_at(0)          # reads address 0: SIGSEGV in native code

def test_after():
    assert "run" in "the run goes on"
'''


def test_a_segfaulting_test_is_one_failure_and_the_run_ends_with_its_summary(tmp_path):
    (tmp_path / "test_crashing.py").write_text(CRASHING)
    p = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                        "-p", "no:cacheprovider", "-q", str(tmp_path / "test_crashing.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1, (p.returncode, out[-3000:])           # failed tests, not -11 (a dead run)
    assert "1 failed, 2 passed" in out, out[-3000:]
    assert "crashed while running 'test_crashing.py::test_segfaults'" in out, out[-3000:]
