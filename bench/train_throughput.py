"""QLoRA training throughput and memory: mlx_qlora vs stock mlx-lm (vs torch+PEFT when installed).

Workload (the issue's): SmolLM2-135M-Instruct, WikiSQL train rows in file order, batch 4, LoRA
rank 8 (alpha 16) on every linear of the last 16 of 30 layers (1.30M trainable), AdamW. Every
system sees the same batches (padded to the longest row); tok/s counts real (non-pad) input
tokens. Each system runs in its own process so peak RSS (ru_maxrss) is its own.

  mlx_qlora      this project, 4-bit base (the embedded Q4_1 GGUF converted with group 32), as
                 `mlx_qlora train` runs it: the CPU engine (rows packed, so it never computes on
                 the padding), default weight cache, cpu_gemm auto (bf16 GEMMs for the frozen
                 products where the CPU has bf16 units and oneMKL is installed, else fp32);
                 torch kept out of the process
  mlx_qlora, fp32      the same with cpu_gemm=fp32 (shown only when auto picked bf16)
  mlx_qlora, cache 0   the default with cpu_weight_cache_mb=0 (no dequantized weight kept)
  mlx_qlora, lean      cache 0 and grad_checkpoint (blocks keep only their input)
  mlx-lm QLoRA   mlx_lm's LoRALinear on the same 4-bit model (quantized_matmul on CPU)
  torch+PEFT     transformers + peft LoRA on the same weights dequantized to fp32, in fp32 and
                 under torch.autocast("cpu", dtype=torch.bfloat16) (bf16 matmuls, oneDNN)

The CPU (model name and its AVX2 / AVX-512 / AMX / bf16 flags) and the GEMM path picked are printed.

Then a Llama-2-7B-shaped model (random 4-bit weights, group 64) takes QLoRA steps with batch 1,
256 tokens and gradient checkpointing, and its peak RSS is printed.

  python bench/train_throughput.py                 # everything (~15 min on 2 CPU cores)
  python bench/train_throughput.py --skip-7b --steps 4
  python bench/train_throughput.py --nproc 1,2     # data parallel only: `mlx_qlora train --nproc N`

--nproc runs the `train` command itself on N local ranks (mlx.launch, ring on loopback, cores / N
threads per rank; global batch 4, the same rows and order for every N), times the steps after
--warmup from metrics.jsonl, checks the per-step losses against N=1, and times the all_sum of one
gradient-sized fp32 buffer between 2 ranks on its own.
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
sys.path.insert(0, str(ROOT))
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"
CACHE = ROOT / "runs" / "bench_cache"
GIB = 1024 ** 3
LAYERS, RANK, ALPHA, BATCH = 16, 8, 16.0, 4


def peak_rss_gib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / GIB if sys.platform == "darwin" else r * 1024 / GIB


def wikisql_texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in open(WIKISQL / "train.jsonl")]
    return rows[:n]


def tokenized(tok, n: int) -> list[list[int]]:
    out = []
    for t in wikisql_texts(n):
        ids = list(tok.encode(t))
        out.append(ids + [tok.eos_token_id])
    return out


def batches(rows: list[list[int]]):
    for i in range(0, len(rows) - BATCH + 1, BATCH):
        yield rows[i:i + BATCH]


def timed(step_fn, rows, warmup: int) -> dict:
    """Run step_fn per batch; time everything after `warmup` batches (wall clock, and the CPU time
    of all the process's threads: on a shared machine tokens per CPU-second is the steadier figure)."""
    tokens, t0 = 0, None
    for i, b in enumerate(batches(rows)):
        if i == warmup:
            t0, c0, tokens = time.perf_counter(), time.process_time(), 0
        step_fn(b)
        tokens += sum(len(r) - 1 for r in b)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tok_s": tokens / dt, "tokens": tokens, "seconds": dt, "tok_per_cpu_s": tokens / cpu,
            "peak_rss_gib": peak_rss_gib()}


# ------------------------------------------------------------------ workers (one per process)
def worker_mlx_qlora(model_dir: str, n_rows: int, warmup: int, weight_cache_mb: float = 1024,
                     grad_checkpoint: bool = False, cpu_gemm: str = "auto") -> dict:
    from mlx_qlora.lean_imports import hide_torch
    hide_torch()            # as the `mlx_qlora train` command does (transformers would import torch)
    import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlx_qlora.train.data import Example, collate
    from mlx_qlora.train.lora import apply_lora, count_parameters
    from mlx_qlora.train.loop import load_base, make_step_fns, prepare_model
    from mlx_qlora.train.config import LoraConfig

    model, tok = load_base(model_dir)
    prepare_model(model)
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, layers=LAYERS))
    # what `mlx_qlora train` runs: the CPU engine on CPU, MLX autodiff elsewhere
    said = []
    grad_fn = make_step_fns(model, grad_checkpoint, weight_cache_mb=weight_cache_mb, say=said.append,
                            cpu_gemm=cpu_gemm).grad
    opt = optim.AdamW(learning_rate=1e-4)
    step_no = [0]
    # as train() runs it beside the CPU engine: scaling and the AdamW update compiled
    from mlx_qlora.train.engines.mlx_step import make_scale_clip, make_update
    update, scale = make_update(model, opt), make_scale_clip(None, compiled=True)

    def step(rows):
        b = collate([Example(np.array(r, np.int32), np.ones(len(r), bool)) for r in rows])
        loss, g = grad_fn(b, (0, step_no[0], 0))
        update(scale(g, b.n_loss)[0])
        mx.eval(model.trainable_parameters(), opt.state)
        step_no[0] += 1

    res = timed(step, tokenized(tok, n_rows), warmup)
    res["trainable"] = count_parameters(model)[0]
    res["engine"] = " ".join(said)
    return res


def worker_mlx_lm(model_dir: str, n_rows: int, warmup: int) -> dict:
    import mlx_qlora  # noqa: F401  (same BLAS, so the comparison is of the QLoRA code alone)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = load(model_dir)
    model.freeze()
    linear_to_lora_layers(model, LAYERS, {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0})
    value_and_grad = nn.value_and_grad(model, default_loss)
    opt = optim.AdamW(learning_rate=1e-4)

    def step(rows):
        t = max(len(r) for r in rows)
        arr = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            arr[i, :len(r)] = r
        lengths = mx.array([[0, len(r) - 1] for r in rows])
        (loss, _), g = value_and_grad(model, mx.array(arr), lengths)
        opt.update(model, g)
        mx.eval(loss, model.trainable_parameters(), opt.state)

    res = timed(step, tokenized(tok, n_rows), warmup)
    res["trainable"] = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return res


def export_fp32_hf(model_dir: str) -> Path:
    """The 4-bit model's weights dequantized to an fp32 HF directory, for torch (cached)."""
    out = CACHE / "smollm2_fp32_hf"
    if (out / "model.safetensors").exists():
        return out
    import mlx_qlora  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model
    from safetensors.numpy import save_file

    model, config = load_model(Path(model_dir))
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits)
            weights[f"{name}.weight"] = np.array(w.astype(mx.float32))
    for k, v in tree_flatten(model.parameters()):
        if not k.endswith((".scales", ".biases")) and k not in weights and v.dtype != mx.uint32:
            weights[k] = np.array(v.astype(mx.float32))
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(model_dir).glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def worker_torch(model_dir: str, n_rows: int, warmup: int, autocast: bool = False) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = CACHE / "smollm2_fp32_hf"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     layers_to_transform=list(range(n_layers - LAYERS, n_layers)), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tok = AutoTokenizer.from_pretrained(str(hf))

    def step(rows):
        t = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), t), dtype=torch.long)
        att = torch.zeros((len(rows), t), dtype=torch.long)
        labels = torch.full((len(rows), t), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            att[i, :len(r)] = 1
            labels[i, :len(r)] = torch.tensor(r)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    class Tok:  # same token ids as the MLX systems
        eos_token_id = tok.eos_token_id

        @staticmethod
        def encode(t):
            return tok.encode(t, add_special_tokens=False)

    res = timed(step, tokenized(Tok, n_rows), warmup)
    res["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return res


def worker_7b(steps: int) -> dict:
    """Llama-2-7B dims, random 4-bit weights built layer by layer (never a full fp32 copy)."""
    import mlx_qlora  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_map
    from mlx_lm.models.llama import Model, ModelArgs

    from mlx_qlora.train.lora import apply_lora, count_parameters
    from mlx_qlora.train.data import collate, Example
    from mlx_qlora.train.loop import make_step_fns, prepare_model
    from mlx_qlora.train.config import LoraConfig

    args = ModelArgs(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, vocab_size=32000,
                     rope_theta=10000.0, tie_word_embeddings=False)
    mx.random.seed(0)
    model = Model(args)
    # Weights are lazy until evaluated: quantize the whole tree, then evaluate one block at a time,
    # so only one block's fp32 random weights ever exist.
    nn.quantize(model, group_size=64, bits=4)
    for child in [model.model.embed_tokens, model.lm_head, model.model.norm] + list(model.layers):
        mx.eval(child.parameters())
    prepare_model(model)
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, layers="all"))
    grad_fn = make_step_fns(model, grad_checkpointing=True, say=lambda m: print(m, file=sys.stderr)).grad
    opt = optim.AdamW(learning_rate=1e-4)
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps):
        b = collate([Example(rng.integers(0, args.vocab_size, 257).astype(np.int32), np.ones(257, bool))])
        t0 = time.perf_counter()
        loss, g = grad_fn(b, (0, i, 0))
        opt.update(model, tree_map(lambda x: x / b.n_loss, g))
        mx.eval(model.trainable_parameters(), opt.state)
        times.append(time.perf_counter() - t0)
    trainable, total = count_parameters(model)
    return {"peak_rss_gib": peak_rss_gib(), "s_per_step": times, "loss": loss / b.n_loss, "trainable": trainable,
            "params": total}


# Rows for this project (worker flags): the default; no fp32 weight kept between steps (every use
# dequantizes the 4-bit weight); least memory (that, and blocks recomputed in backward).
MLX_QLORA_ROWS = {"mlx_qlora": [], "mlx_qlora, fp32": ["--cpu-gemm", "fp32"],
                  "mlx_qlora, cache 0": ["--weight-cache-mb", "0"],
                  "mlx_qlora, lean": ["--weight-cache-mb", "0", "--grad-checkpoint"]}
WORKERS = {"mlx_qlora": worker_mlx_qlora, "mlx-lm": worker_mlx_lm, "torch": worker_torch}


# ------------------------------------------------------------------ data parallel (--nproc)
def worker_allreduce(size: int, reps: int = 20) -> dict:
    """Under mlx.launch: seconds per all_sum of a ``size``-float buffer (what a step adds)."""
    import mlx_qlora  # noqa: F401
    import mlx.core as mx

    from mlx_qlora.train.distributed import init_world, sum_step

    world = init_world()
    g = {"g": mx.ones((size,), mx.float32)}
    sum_step(world, g, [1.0])   # connect / warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        sum_step(world, g, [1.0, 2.0, 3.0])
    return {"ranks": world.size, "s_per_all_sum": (time.perf_counter() - t0) / reps, "floats": size}


def run_ranks(model: str, data: Path, nproc: int, steps: int, threads: int = 0) -> dict:
    out = CACHE / f"dp_{nproc}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    threads = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    env = dict(os.environ, **{k: threads for k in ("MLX_QLORA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cmd = [sys.executable, "-m", "mlx_qlora.cli", "train", "--nproc", str(nproc), "-m", model, "--data", str(data),
           "-o", str(out), "--steps", str(steps), "--batch_size", str(BATCH), "--lora.rank", str(RANK),
           "--lora.alpha", str(ALPHA), "--lora.layers", str(LAYERS), "--eval_every", "0", "--eval_batches", "1",
           "--checkpoint_every", "0", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "train_loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"threads": int(threads), "recs": recs, "per_rank": summary.get("tok_per_s_per_rank", [])}


def data_parallel(a) -> None:
    nprocs = [int(x) for x in a.nproc.split(",")]
    data = CACHE / "wikisql_dp"
    data.mkdir(parents=True, exist_ok=True)
    rows = wikisql_texts(BATCH * (a.warmup + a.steps) + 8)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[:-8]))
    (data / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[-8:]))
    # a list like 1,2,1,2 interleaves repeats, so a shared machine's drift hits every N alike
    runs = [(n, run_ranks(a.model, data, n, a.warmup + a.steps, a.threads_per_rank)) for n in nprocs]
    base = next((r for _, r in runs if "recs" in r), {})
    print(f"\nData parallel: `mlx_qlora train --nproc N`, SmolLM2-135M 4-bit, WikiSQL, global batch {BATCH}, "
          f"LoRA rank {RANK} on the last {LAYERS} layers, {a.steps} steps timed after {a.warmup} "
          f"({os.cpu_count()} CPU cores)\n")
    print("| ranks | threads/rank | tok/s | s/step | per-rank tok/s | max abs(loss - first run's) |")
    print("|------:|-------------:|------:|-------:|:---------------|----------------------------:|")
    tok_s: dict[int, list[float]] = {}
    for n, r in runs:
        if "error" in r:
            print(f"| {n} | failed: {r['error']} |")
            continue
        timed_recs = r["recs"][a.warmup:]
        tokens = timed_recs[-1]["tokens"] - (r["recs"][a.warmup - 1]["tokens"] if a.warmup else 0)
        secs = sum(x["step_s"] for x in timed_recs)
        tok_s.setdefault(n, []).append(tokens / secs)
        diff = max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(r["recs"], base["recs"]))
        per = ", ".join(f"{x:.0f}" for x in r["per_rank"]) or "-"
        print(f"| {n} | {r['threads']} | {tokens / secs:.1f} | {secs / len(timed_recs):.3f} | {per} | {diff:.1e} |")
    if len(tok_s) > 1:
        ref = sorted(tok_s[nprocs[0]])[len(tok_s[nprocs[0]]) // 2]
        print("\nmedian tok/s: " + ", ".join(f"{n} rank(s) {sorted(v)[len(v) // 2]:.1f} "
                                             f"({sorted(v)[len(v) // 2] / ref:.2f}x)" for n, v in tok_s.items()))
    if max(nprocs) > 1:
        launcher = Path(sys.executable).parent / "mlx.launch"
        p = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable, __file__,
                            "--worker", "allreduce", "--allreduce-size", str(a.allreduce_size)],
                           capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if lines:
            r = json.loads(lines[0])
            print(f"\nall_sum of {r['floats']:,} fp32 (one step's gradients) between 2 local ranks: "
                  f"{1000 * r['s_per_all_sum']:.1f} ms")


def run_worker(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + argv
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(CACHE / "smollm2_q4"), help="4-bit MLX SmolLM2 dir (made if absent)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per system (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mlx-lm-steps", type=int, default=2, help="timed steps for stock mlx-lm (it is slow)")
    ap.add_argument("--steps-7b", type=int, default=2)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--weight-cache-mb", type=float, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-gemm", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for every system (MLX_QLORA_THREADS, OMP/OpenBLAS/MKL); default: all cores")
    ap.add_argument("--nproc", default=None, help="data parallel only: rank counts to compare, e.g. 1,2")
    ap.add_argument("--threads-per-rank", type=int, default=0, help="with --nproc (default: cores / N)")
    ap.add_argument("--allreduce-size", type=int, default=1_302_528, help=argparse.SUPPRESS)  # the trainable count
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker == "allreduce":
        print(json.dumps(worker_allreduce(a.allreduce_size)))
        return

    if a.worker == "7b":
        print(json.dumps(worker_7b(a.steps_7b)))
        return
    if a.worker:
        n_rows = BATCH * (a.warmup + a.steps)
        extra = {"weight_cache_mb": a.weight_cache_mb, "grad_checkpoint": a.grad_checkpoint,
                 "cpu_gemm": a.cpu_gemm} if a.worker == "mlx_qlora" else \
            {"autocast": a.autocast} if a.worker == "torch" else {}
        print(json.dumps(WORKERS[a.worker](a.model, n_rows, a.warmup, **extra)))
        return

    if not (Path(a.model) / "config.json").exists():
        from mlx_qlora.model.convert import ConvertConfig, run_convert
        run_convert(ConvertConfig(source=None, out_dir=a.model, q_bits=4, q_group_size=32))
    if a.nproc:
        data_parallel(a)
        return
    from mlx_qlora.train.engines.cpu_gemm import cpu_summary

    if a.threads:      # the workers inherit it; torch reads OMP_NUM_THREADS
        os.environ.update({k: str(a.threads) for k in ("MLX_QLORA_THREADS", "OMP_NUM_THREADS",
                                                       "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    threads = a.threads or os.cpu_count()
    print(f"CPU: {cpu_summary()}, {os.cpu_count()} cores, {threads} threads per system", flush=True)
    base = ["--model", a.model, "--warmup", str(a.warmup)]
    results = {}
    for name, flags in MLX_QLORA_ROWS.items():
        if name == "mlx_qlora, fp32" and "GEMMs: bf16" not in results["mlx_qlora"].get("engine", ""):
            continue                           # auto already ran fp32
        results[name] = run_worker("mlx_qlora", base + ["--steps", str(a.steps)] + flags)
        print(f"{name}: {results[name]}", flush=True)
    if not a.skip_mlx_lm:
        results["mlx-lm QLoRA"] = run_worker("mlx-lm", ["--model", a.model, "--warmup", "1", "--steps", str(a.mlx_lm_steps)])
        print(f"mlx-lm QLoRA: {results['mlx-lm QLoRA']}", flush=True)
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    if have_torch and not a.skip_torch:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from bench.train_throughput import export_fp32_hf; export_fp32_hf({a.model!r})"], check=True)
        for name, flags in (("torch+PEFT fp32", []), ("torch+PEFT bf16 autocast", ["--autocast"])):
            results[name] = run_worker("torch", base + ["--steps", str(a.steps)] + flags)
            print(f"{name}: {results[name]}", flush=True)

    # the ratios are against the faster torch row
    torch_rows = [results[n] for n in ("torch+PEFT fp32", "torch+PEFT bf16 autocast") if "tok_s" in results.get(n, {})]
    torch_r = max(torch_rows, key=lambda r: r["tok_s"], default={})
    stock = results.get("mlx-lm QLoRA", {})
    print(f"\nSmolLM2-135M, WikiSQL, batch {BATCH}, LoRA rank {RANK} on all linears of the last {LAYERS} layers "
          f"({threads} threads on {os.cpu_count()} cores; CPU: {cpu_summary()}); 'vs torch': the faster torch row\n")
    print(f"| {'system':<24} | {'tok/s':>7} | {'tok/CPU-s':>9} | {'peak RSS GiB':>12} | {'trainable':>9} "
          f"| {'tok/s vs torch':>14} | {'RSS vs torch':>12} | {'tok/s vs mlx-lm':>15} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 11}|{'-' * 14}|{'-' * 11}|{'-' * 16}|{'-' * 14}|{'-' * 17}|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name:<24} | failed: {r['error']}")
            continue
        vs_t = f"{r['tok_s'] / torch_r['tok_s']:.2f}x" if "tok_s" in torch_r else "-"
        rss_t = f"{r['peak_rss_gib'] / torch_r['peak_rss_gib']:.2f}x" if "tok_s" in torch_r else "-"
        vs_m = f"{r['tok_s'] / stock['tok_s']:.1f}x" if "tok_s" in stock else "-"
        print(f"| {name:<24} | {r['tok_s']:7.1f} | {r['tok_per_cpu_s']:9.1f} | {r['peak_rss_gib']:12.2f} "
              f"| {r['trainable']:9,} | {vs_t:>14} "
              f"| {rss_t:>12} | {vs_m:>15} |")
    if "engine" in results.get("mlx_qlora", {}):
        print(f"\nmlx_qlora (default): {results['mlx_qlora']['engine']}")
    if not a.skip_7b:
        r = run_worker("7b", ["--steps-7b", str(a.steps_7b)])
        if "error" in r:
            print(f"\n7B-shaped llama: failed: {r['error']}")
        else:
            steps = ", ".join(f"{t:.0f}" for t in r["s_per_step"])
            print(f"\n7B-shaped llama (Llama-2-7B dims, random 4-bit g64, {r['params'] / 1e9:.2f}B params, "
                  f"LoRA r{RANK} all-linear all layers = {r['trainable']:,} trainable), batch 1 x 256 tokens, "
                  f"gradient checkpointing: peak RSS {r['peak_rss_gib']:.2f} GiB, s/step: {steps}, loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
