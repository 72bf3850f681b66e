"""Atomic outputs: nothing half-written ever appears under the name the user asked for.

Every file or directory the toolkit writes is first built under a temporary name beside its
destination (same filesystem, so the final ``rename`` is atomic) and renamed into place only
when complete. A failure or Ctrl-C removes the temporary and leaves any existing output as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; choose another -o or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    out = Path(out_dir)
    _check_target(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, force: bool = False):
    """Yield a temporary path beside ``path`` that becomes ``path`` only if the block succeeds.

    The temporary keeps ``path``'s suffix: ``mx.save_safetensors`` appends ``.safetensors`` to a
    name without it, which would write beside the path this yields.
    """
    out = Path(path)
    _check_target(out, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)  # mkstemp makes it private; an exported file is an ordinary file
    os.replace(tmp, out)
