"""GPU training throughput and peak memory: mlx_qlora vs stock mlx-lm LoRA vs torch + PEFT.

    python bench/train_gpu.py                     # Llama-3.2-1B and Llama-3.1-8B dims (the GPU table)
    python bench/train_gpu.py --shape tiny        # seconds on a CPU (tests/test_bench_train_gpu.py)
    python bench/train_gpu.py --shape 1b --layers 2 --vocab 32000 --batch 1 --seq 512 \\
        --systems mlx_qlora,mlx_qlora_plain_ce    # the chunked loss's memory effect on a CPU

Random weights with the real shapes, quantized 4-bit (group 64) for the MLX systems, a bf16 base for
torch + PEFT (float32 on CPU); LoRA rank 16 (alpha 32) on every linear of every layer; random
tokens, every position in the loss. Each system runs in its own process (so its peak memory is its
own), ``--warmup`` steps first (compilation), then ``--steps`` timed optimizer steps. Rows:

- ``mlx_qlora``: ``loop.make_step_fns(...).whole_step`` with the CPU engine off, i.e. the path
  Metal/CUDA take in ``train()`` (train/engines/mlx_step.py: the whole step one compiled graph, chunked
  cross-entropy), its 4-bit products as ``base_matmul: auto`` picks them (dequantize + dense GEMM
  on CUDA, train/engines/dequant_gemm.py; the quantized kernels elsewhere); on CPU the CPU kernels are
  switched off so the same path runs;
- ``mlx_qlora_qmm`` / ``mlx_qlora_dense``: the same with the quantized kernels / dequantize + GEMM
  forced (the two side by side on any device);
- ``mlx_qlora_ckpt``: ``mlx_qlora`` with gradient checkpointing;
- ``mlx_qlora_plain_ce``: the same compiled step with a plain full-logits cross-entropy (the
  chunked loss's memory effect, side by side);
- ``mlx_lm``: mlx-lm's LoRA layers, its ``default_loss`` and a step compiled the way its trainer
  compiles it;
- ``torch``: transformers + PEFT, bf16 base on CUDA (skipped when torch/peft are not importable).

Peak memory: ``mx.get_peak_memory()`` / ``torch.cuda.max_memory_allocated()`` on a GPU; on CPU
also the process's peak RSS. Ratios are against mlx-lm and torch measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama-3.2-1B / Llama-3.1-8B config.json dimensions; tiny: a CPU smoke shape
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SYSTEMS = ["mlx_qlora", "mlx_qlora_qmm", "mlx_qlora_dense", "mlx_qlora_ckpt", "mlx_qlora_plain_ce", "mlx_lm",
           "torch"]
DEFAULT_SYSTEMS = ["mlx_qlora", "mlx_qlora_qmm", "mlx_qlora_ckpt", "mlx_lm", "torch"]
BASE_MATMUL = {"mlx_qlora_qmm": "quantized", "mlx_qlora_dense": "dense"}    # others: auto
RANK, ALPHA, GROUP, BITS = 16, 32, 64, 4
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def dims(a) -> dict:
    d = dict(SHAPES[a.shape])
    if a.layers:
        d["num_hidden_layers"] = a.layers
    if a.vocab:
        d["vocab_size"] = a.vocab
    return d


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


# ---------------------------------------------------------------- MLX workers
def mlx_model(d: dict, seed: int = 0):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    model = Model(ModelArgs(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, **d))
    model.set_dtype(mx.bfloat16 if on_gpu else mx.float32)
    nn.quantize(model, group_size=GROUP, bits=BITS)
    for layer in model.layers:            # one layer's float weights alive at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def tokens(a, vocab: int, step: int):
    import numpy as np

    return np.random.default_rng(step).integers(0, vocab, (a.batch, a.seq + 1)).astype(np.int32)


def run_mlx_qlora(a, d: dict, system: str) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlx_qlora.train import loop
    from mlx_qlora.train.engines import dequant_gemm, mlx_cpu_kernels, mlx_step
    from mlx_qlora.train.config import LoraConfig
    from mlx_qlora.train.data import Example, collate
    from mlx_qlora.train.lora import apply_lora

    if a.ce_chunk_rows:
        mlx_step.CE_CHUNK_ELEMENTS = a.ce_chunk_rows * d["vocab_size"]
    model = mlx_model(d)
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, layers="all", targets="all-linear"))
    opt = optim.AdamW(learning_rate=1e-5)
    with mlx_cpu_kernels.disabled():         # on CPU: the GPU path, not the CPU kernels
        base_matmul = BASE_MATMUL.get(system, "auto")
        # as train() does on the GPU path with one micro-batch: loss, gradient, / loss tokens,
        # clipping to norm 1 and AdamW in one compiled graph (mlx_step.make_train_step)
        if system == "mlx_qlora_plain_ce":   # head=None: full logits
            train_step = mlx_step.make_train_step(model, None, opt, 1.0, dense=dequant_gemm.resolve(base_matmul))
        else:
            fns = loop.make_step_fns(model, system == "mlx_qlora_ckpt", use_cpu_engine=False,
                                     say=lambda s: print(s, file=sys.stderr), batch_shape=(a.batch, a.seq),
                                     base_matmul=base_matmul)
            train_step = fns.whole_step(opt, 1.0)
        mask = np.ones(a.seq + 1, bool)

        def step(i):
            b = collate([Example(row, mask) for row in tokens(a, d["vocab_size"], i)])
            loss, norm = train_step(b, (0, i, 0))
            assert np.isfinite(norm)             # train() stops on a non-finite step
            return loss / b.n_loss

        # which 4-bit products ran: dequantize + GEMM ("dense") or the quantized kernels
        return {**timed(a, step, mx), "base_matmul": "dense" if dequant_gemm.resolve(base_matmul) else "quantized"}


def run_mlx_lm(a, d: dict) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = mlx_model(d)
    model.freeze()
    linear_to_lora_layers(model, d["num_hidden_layers"], {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                          "keys": LINEARS})
    opt = optim.AdamW(learning_rate=1e-5)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, lengths):          # as mlx_lm.tuner.trainer.train compiles its step
        (loss, toks), grad = loss_value_and_grad(model, batch, lengths)
        opt.update(model, grad)
        return loss, toks

    lengths = mx.array([[1, a.seq]] * a.batch)

    def step(i):
        loss, toks = compiled(mx.array(tokens(a, d["vocab_size"], i)), lengths)
        mx.eval(state, loss, toks)
        return loss.item()

    return timed(a, step, mx)


def timed(a, step, mx) -> dict:
    for i in range(a.warmup):
        step(i)
    mx.reset_peak_memory()
    t = time.perf_counter()
    losses = [step(a.warmup + i) for i in range(a.steps)]
    sec = time.perf_counter() - t
    return {"tok_s": a.steps * a.batch * a.seq / sec, "peak_gib": mx.get_peak_memory() / 2 ** 30,
            "rss_gib": rss_gib(), "loss": losses[-1], "device": str(mx.default_device())}


# ---------------------------------------------------------------- torch worker
def run_torch(a, d: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(**d, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=max(a.seq + 1, 2048))
    torch.set_default_dtype(dtype)          # built in bf16 directly: no fp32 copy of an 8B model
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=[n.split(".")[-1] for n in LINEARS]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(i):
        x = torch.from_numpy(tokens(a, d["vocab_size"], i)[:, :-1]).long().to(dev)
        loss = model(input_ids=x, labels=x).loss      # transformers shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(a.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    losses = [step(a.warmup + i) for i in range(a.steps)]
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else rss_gib()
    return {"tok_s": a.steps * a.batch * a.seq / sec, "peak_gib": peak, "rss_gib": rss_gib(), "loss": losses[-1],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def worker(a) -> None:
    d = dims(a)
    if a.worker != "torch":   # every MLX row: a real CBLAS bound under mlx.core on CPU (mlx_qlora/__init__)
        import mlx_qlora  # noqa: F401
    if a.worker == "torch":
        res = run_torch(a, d)
    elif a.worker == "mlx_lm":
        res = run_mlx_lm(a, d)
    else:
        res = run_mlx_qlora(a, d, a.worker)
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- driver
def available(system: str) -> str | None:
    """None when the system can run here, else why not."""
    if system == "torch":
        import importlib.util

        missing = [m for m in ("torch", "peft", "transformers") if importlib.util.find_spec(m) is None]
        return f"{', '.join(missing)} not importable" if missing else None
    return None


def run_one(a, shape: str, system: str) -> dict:
    argv = [sys.executable, __file__, "--worker", system, "--shape", shape, "--batch", str(a.batch), "--seq",
            str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    argv += ["--layers", str(a.layers)] if a.layers else []
    argv += ["--vocab", str(a.vocab)] if a.vocab else []
    argv += ["--ce-chunk-rows", str(a.ce_chunk_rows)] if a.ce_chunk_rows else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=a.timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {p.returncode}", "wall_s": time.perf_counter() - t}
    return {**json.loads(line[7:]), "wall_s": time.perf_counter() - t}


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}x" if x and y else "-"


def table(results: dict) -> str:
    rows = ["| shape | system | tok/s | peak memory GiB | tok/s vs mlx-lm | memory vs mlx-lm | tok/s vs torch |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for shape, res in results.items():
        lm, th = res.get("mlx_lm", {}), res.get("torch", {})
        for system, r in res.items():
            if "error" in r or "skipped" in r:
                rows.append(f"| {shape} | {system} | {r.get('skipped') or 'failed: ' + r['error'][:80]} | | | | |")
                continue
            rows.append(f"| {shape} | {system} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | "
                        f"{ratio(r['tok_s'], lm.get('tok_s'))} | {ratio(r['peak_gib'], lm.get('peak_gib'))} | "
                        f"{ratio(r['tok_s'], th.get('tok_s'))} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b,8b", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma list of " + ", ".join(SYSTEMS))
    p.add_argument("--batch", type=int, default=0, help="rows per step (default 4; tiny: 2)")
    p.add_argument("--seq", type=int, default=0, help="tokens per row (default 512; tiny: 64)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (CPU runs)")
    p.add_argument("--vocab", type=int, default=0, help="override the shape's vocabulary (CPU runs)")
    p.add_argument("--ce-chunk-rows", type=int, default=0, help="rows per chunk of the chunked loss (CPU runs)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per system")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.shape == "tiny"
    a.batch, a.seq = a.batch or (2 if tiny else 4), a.seq or (64 if tiny else 512)
    if a.worker:
        worker(a)
        return 0
    shapes, systems = a.shape.split(","), a.systems.split(",")
    bad = [s for s in shapes if s not in SHAPES] + [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"error: unknown shape/system {bad[0]!r}; shapes: {', '.join(SHAPES)}; systems: {', '.join(SYSTEMS)}",
              file=sys.stderr)
        return 2
    results: dict = {}
    for shape in shapes:
        results[shape] = {}
        for system in systems:
            why = available(system)
            print(f"[{shape}] {system} ...", end=" ", file=sys.stderr, flush=True)
            r = {"skipped": f"skipped: {why}"} if why else run_one(a, shape, system)
            results[shape][system] = r
            print(r.get("skipped") or r.get("error") or f"{r['tok_s']:,.0f} tok/s, {r['peak_gib']:.2f} GiB peak "
                  f"(RSS {r['rss_gib']:.2f} GiB), loss {r['loss']:.3f}, {r['wall_s']:.0f} s"
                  + (f", 4-bit products {r['base_matmul']}" if "base_matmul" in r else ""), file=sys.stderr)
    devices = sorted({r["device"] for res in results.values() for r in res.values() if "device" in r})
    print(f"\nbatch {a.batch} x {a.seq} tokens, LoRA rank {RANK} on all linears, 4-bit g{GROUP} MLX base; "
          f"devices: {', '.join(devices)}")
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
