"""Packaging: the license is an SPDX string, every library the code relies on has a minimum
version, and building the package (wheel and editable, as ``pip install [-e] .`` does) prints no
setuptools warning of ours."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_spdx_and_setuptools_knows_it():
    assert isinstance(PYPROJECT["project"]["license"], str) and re.fullmatch(r"[A-Za-z0-9.\-+ ()]+",
                                                                             PYPROJECT["project"]["license"])
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert tuple(int(x) for x in req.split(">=")[1].split(".")) >= (77,)  # SPDX strings need setuptools 77


def test_every_dependency_has_a_minimum_version():
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        deps += extra
    assert [d for d in deps if ">=" not in d] == []


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_build_prints_no_setuptools_warning(tmp_path, kind):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "mlx_qlora", tmp_path / "mlx_qlora", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = (f"from setuptools import build_meta as b; print(b.build_{kind}({str(tmp_path / 'dist')!r}))")
    p = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert not re.search(r"Warning|deprecat|!!", out, re.I), [l for l in out.splitlines()
                                                             if re.search(r"warn|deprecat|!!", l, re.I)]
