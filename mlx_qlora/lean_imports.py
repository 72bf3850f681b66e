"""Keep torch out of processes that never use it.

transformers (which mlx-lm uses for tokenizers and chat templates) imports torch at import time
whenever torch is installed: ~0.25 GiB of resident memory and ~1 s, in a process that computes
with MLX and NumPy only. A ``None`` entry in ``sys.modules`` makes ``importlib.util.find_spec``
report the package as absent, so transformers takes its torch-free path. The console entry point
does this for the commands that never need torch (``cli.TORCH_FREE``).
"""
from __future__ import annotations

import sys


def hide_torch() -> bool:
    """Make torch look uninstalled to this process; False (nothing done) when torch or
    transformers is already imported, since their view of it is fixed by then."""
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None
    return True
