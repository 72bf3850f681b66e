"""Training checkpoints: ``out_dir/checkpoints/step_NNNNNNN`` (adapter, AdamW state, state.json).

Each is written to a temporary directory and renamed, then ``checkpoints/latest`` names it; the
oldest beyond ``keep`` are renamed to a hidden name before they are deleted, so a process killed at
any moment leaves only whole ``step_*`` directories (``atomic.remove_stale`` clears the rest on the
next run). The current adapter is also written to ``out_dir`` for the other commands.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..atomic import atomic_dir, atomic_file
from ..errors import require
from .config import TrainConfig
from .lora import save_adapter, save_weights


def _set_path(tree, path: str, value):
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def save_checkpoint(out: Path, model, optimizer, state: dict, cfg: TrainConfig, keep: int) -> Path:
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:07d}"
    final = ck / name
    with atomic_dir(final, force=True) as tmp:
        save_adapter(model, tmp, cfg.lora, base_model=cfg.model)
        save_weights(dict(tree_flatten(optimizer.state)), tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    with atomic_file(ck / "latest", force=True) as tmp:
        tmp.write_text(name + "\n")
    for old in sorted(p for p in ck.glob("step_*") if p.is_dir())[:-keep]:
        # renamed first (one atomic step), then deleted: a kill -9 inside the delete leaves a
        # hidden .old- directory that the next run removes, never a half-deleted step_* one
        trash = old.with_name(f".{old.name}.old-pruned")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    save_adapter(model, out, cfg.lora, base_model=cfg.model)  # the current adapter for other commands
    return final


def load_checkpoint(out: Path, model, optimizer) -> dict:
    latest = out / "checkpoints" / "latest"
    require(latest.is_file(), f"--resume: no checkpoint in {out}/checkpoints; run without --resume to start fresh")
    ck = out / "checkpoints" / latest.read_text().strip()
    weights = mx.load(str(ck / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    for k, v in mx.load(str(ck / "optimizer.safetensors")).items():
        _set_path(optimizer.state, k, v)
    return json.loads((ck / "state.json").read_text())
