"""The environment of a test's child process: this one's, with paths put in front of PYTHONPATH.

A child must inherit the parent's PYTHONPATH, not replace it: where MLX and the other libraries
are installed with ``pip --target`` (a GPU machine with no registry) they are found only through
it, and a child that loses it fails with "No module named 'mlx'"."""
from __future__ import annotations

import os


def child_env(*front, **extra) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, front), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env
