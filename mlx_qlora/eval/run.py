"""``run_eval(EvalConfig)``: what ``mlx_qlora eval`` calls; picks loss, task or the quant table."""
from __future__ import annotations

import json
from pathlib import Path

from .config import EvalConfig


def run_eval(cfg: EvalConfig, say=print) -> dict:
    """Loss/perplexity (default), a generation task (``--task`` or the recipe's ``task:``) or
    the quantization table (``--quant-sweep``). Returns the numbers it printed."""
    if cfg.quant_sweep:
        from .quant_table import quant_sweep

        result = quant_sweep(cfg, say)
    elif cfg.task_cfg is not None:
        from .tasks import evaluate_task

        result = evaluate_task(cfg, say)
    else:
        from .loss import evaluate_loss

        result = evaluate_loss(cfg, say).as_dict()
    if cfg.json_out:
        write_json(cfg.json_out, result)
        say(f"results: {cfg.json_out}")
    return result


def write_json(path: str | Path, result: dict) -> None:
    """Results as JSON (``--json FILE``), written atomically."""
    from ..atomic import atomic_file

    with atomic_file(Path(path), force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
