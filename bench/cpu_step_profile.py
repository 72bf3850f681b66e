"""Where a CPU-engine training step goes: exclusive wall time (ms per step) of each engine phase.

The bench workload (SmolLM2-135M, WikiSQL rows in file order, batch 4, LoRA rank 8 on every linear
of the last 16 layers, AdamW), run as bench/train_throughput.py's default mlx_qlora row runs it.
The engine's functions are wrapped with timers that subtract their timed callees, so each line is
time spent in that function itself on the calling thread (pool threads it waits for included).

  python bench/cpu_step_profile.py --steps 6            # cpu_gemm auto
  python bench/cpu_step_profile.py --cpu-gemm fp32
  python bench/cpu_step_profile.py --cpu-time       # one thread, CPU time: steadier on a busy machine
  MLX_QLORA_FUSED=off python bench/cpu_step_profile.py   # NumPy's elementwise kernels on the bf16 path
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

_ACC: dict[str, float] = defaultdict(float)
_STACK: list[float] = []
CLOCK = [time.perf_counter]


def timer(name: str, f):
    """``f`` wrapped: its own time (minus that of timed callees) is added to _ACC[name]."""
    def wrapped(*a, **k):
        t0 = CLOCK[0]()
        _STACK.append(0.0)
        try:
            return f(*a, **k)
        finally:
            spent = CLOCK[0]() - t0
            _ACC[name] += spent - _STACK.pop()
            if _STACK:
                _STACK[-1] += spent
    return wrapped


def instrument() -> None:
    from mlx_qlora.train.engines import cpu_gemm, numpy_engine as ne
    ops = ne.ops
    for name in ("rms", "rms_back", "attention", "attention_back", "swiglu", "swiglu_back", "softmax_ce_rows"):
        setattr(ops, name, timer(name, getattr(ops, name)))
    from mlx_qlora.train.engines import cpu_fused, cpu_proj
    for name in ("rms", "rms_back", "rope", "swiglu", "swiglu_back", "attention", "attention_back"):  # bf16 path: fused
        setattr(cpu_fused.Fused, name, timer(f"{name} (fused)", getattr(cpu_fused.Fused, name)))
    ne.to_bf16 = cpu_proj.to_bf16 = timer("to_bf16", ne.to_bf16)
    cpu_gemm.MklBf16.matmul = timer("gemm bf16 (oneMKL)", cpu_gemm.MklBf16.matmul)
    for cls, meths in ((ne._Proj, ("forward", "backward", "weight", "matmul")),
                       (ne._Block, ("forward", "backward", "_rope", "_norm_heads", "_norm_heads_back")),
                       (ne.CpuEngine, ("_embed", "_head_loss", "_pack", "_loss_and_grad"))):
        for m in meths:
            label = {("_Proj", "forward"): "proj fwd: LoRA, bias, dropout", ("_Proj", "backward"): "proj bwd: LoRA",
                     ("_Proj", "matmul"): "proj matmul (fp32 BLAS / dispatch)",
                     ("_Block", "forward"): "block fwd: residual, split",
                     ("_Block", "backward"): "block bwd: residual, concat",
                     ("CpuEngine", "_loss_and_grad"): "grads to MLX, loop"}.get((cls.__name__, m), m)
            setattr(cls, m, timer(label, getattr(cls, m)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "bench_cache" / "smollm2_q4"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-gemm", default="auto")
    ap.add_argument("--cpu-time", action="store_true",
                    help="run on one thread and time with its CPU clock (waits for the CPU not counted)")
    a = ap.parse_args()
    if a.cpu_time:
        import os
        os.environ.update(MLX_QLORA_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        CLOCK[0] = time.thread_time
    import train_throughput as tt
    from mlx_qlora.lean_imports import hide_torch
    hide_torch()
    import mlx_qlora  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_qlora.train.config import LoraConfig
    from mlx_qlora.train.data import Example, collate
    from mlx_qlora.train.lora import apply_lora
    from mlx_qlora.train.loop import load_base, make_step_fns, prepare_model

    if not (Path(a.model) / "config.json").exists():
        from mlx_qlora.model.convert import ConvertConfig, run_convert
        run_convert(ConvertConfig(source=None, out_dir=a.model, q_bits=4, q_group_size=32))
    model, tok = load_base(a.model)
    prepare_model(model)
    apply_lora(model, LoraConfig(rank=tt.RANK, alpha=tt.ALPHA, layers=tt.LAYERS))
    said = []
    instrument()
    grad_fn = make_step_fns(model, say=said.append, cpu_gemm=a.cpu_gemm).grad
    opt = optim.AdamW(learning_rate=1e-4)
    from mlx_qlora.train.engines.mlx_step import make_scale_clip, make_update   # compiled, as train() runs it
    update, scale = make_update(model, opt), make_scale_clip(None, compiled=True)
    step_fn = timer("optimizer (MLX AdamW, compiled)", lambda b, g: (update(scale(g, b.n_loss)[0]),
                                                                     mx.eval(model.trainable_parameters(), opt.state)))
    rows = tt.tokenized(tok, tt.BATCH * (a.warmup + a.steps))
    tokens, total = 0, 0.0
    for i, r in enumerate(tt.batches(rows)):
        if i == a.warmup:
            _ACC.clear()
        t0 = CLOCK[0]()
        b = collate([Example(np.array(x, np.int32), np.ones(len(x), bool)) for x in r])
        _, g = grad_fn(b, (0, i, 0))
        step_fn(b, g)
        if i >= a.warmup:
            total += CLOCK[0]() - t0
            tokens += sum(len(x) - 1 for x in r)
    n = a.steps
    print(" ".join(said))
    print(f"{n} steps, {tokens / n:.0f} tokens/step, {1e3 * total / n:.1f} ms/step, {tokens / total:.1f} tok/s")
    print(f"| {'phase':<38} | {'ms/step':>8} | {'share':>6} |")
    for name, t in sorted(_ACC.items(), key=lambda kv: -kv[1]):
        print(f"| {name:<38} | {1e3 * t / n:8.1f} | {t / total:6.1%} |")
    rest = total - sum(_ACC.values())
    print(f"| {'(untimed: collate, embed lookups)':<38} | {1e3 * rest / n:8.1f} | {rest / total:6.1%} |")


if __name__ == "__main__":
    main()
