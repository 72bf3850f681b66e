"""Atomic outputs: nothing half-written ever appears under the name the user asked for.

Every file or directory the toolkit writes is first built under a temporary name beside its
destination (same filesystem, so the final ``rename`` is atomic) and renamed into place only
when complete. A failure or Ctrl-C removes the temporary and leaves any existing output as it was.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# errno values that mean "this place cannot take the output", not a bug
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}
# libraries that wrap the OS error in their own text: MLX ("[write] Unable to write"), safetensors
# ("I/O error: File too large"), NumPy's tofile ("5120 requested and 1518 written")
_WRITE_FAILED = ("Unable to write", "File too large", "No space left", "I/O error", "requested and")


def write_error(e: BaseException, out: Path) -> UserError | None:
    """The one-line error for a write into ``out`` that the disk refused (full, file size limit,
    read-only, no permission); None when ``e`` is something else (a bug keeps its traceback)."""
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        return UserError(f"cannot write {out}: {e.strerror} (disk full or file size limit); free space or "
                         "choose another -o; nothing was written")
    if isinstance(e, OSError) and e.errno in _NO_WRITE:
        return UserError(f"cannot write {out}: {e.strerror}; choose a writable -o")
    if isinstance(e, (RuntimeError, OSError)) or type(e).__name__ == "SafetensorError":
        text = str(e)
        if any(m in text for m in _WRITE_FAILED):
            return UserError(f"cannot write {out}: {text.strip().splitlines()[0]} (disk full or file size "
                             "limit?); free space or choose another -o; nothing was written")
    return None


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; choose another -o or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_error(e, out) or e) from None


@contextmanager
def _cleanup_on_error(out: Path, remove):
    """Run ``remove`` on any failure; a refused write becomes the one-line ``write_error``."""
    try:
        yield
    except BaseException as e:
        remove()
        err = write_error(e, out)
        if err is not None:
            raise err from None
        raise


@contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    out = Path(out_dir)
    _check_target(out, force)
    with _cleanup_on_error(out, lambda: None):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary directory
    with _cleanup_on_error(out, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
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
    with _cleanup_on_error(out, lambda: None):
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    with _cleanup_on_error(out, lambda: Path(tmp).unlink(missing_ok=True)):
        yield Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; an exported file is an ordinary file
    os.replace(tmp, out)


def remove_stale(directory: str | Path) -> list[str]:
    """Remove the temporaries a killed writer left in ``directory`` (``.NAME.tmp-*`` and
    ``.NAME.old-*``, the names this module gives them); only for a directory one process writes,
    such as a training run's output. Returns the names removed."""
    d = Path(directory)
    gone = []
    for p in (list(d.glob(".*.tmp-*")) + list(d.glob(".*.old-*"))) if d.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone.append(p.name)
    return gone
