"""Time to first token and decode speed: mlx_qlora's engines vs stock mlx-lm and llama.cpp.

    python bench/decode.py                       # embedded SmolLM2 (converted to MLX on the fly)
    python bench/decode.py --mlx-model DIR --gguf FILE --tokens 128 --reps 3

Every row decodes the same chat prompt greedily for exactly ``--tokens`` tokens (eos ignored).
TTFT = prompt in -> first token out (ms); decode = tokens/s after the first token; the ratios are
against llama.cpp (llama-cpp-python, its own generate loop) with all cores on the same GGUF. The
row marked ``default`` is the engine ``mlx_qlora chat MODEL_DIR`` loads with no flag (engine and
thread count chosen as chat chooses them, at load time). Rows take the median of ``--reps`` runs,
interleaved. Then: adapter switch times, and TTFT over the turns of one conversation
(the KV cache is reused, so it should not grow with the history).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx_qlora  # noqa: E402,F401  (binds the fast BLAS before mlx.core)

PROMPT = "Write a long story about a robot who learns to paint."


def make_random_adapter(model_dir: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A rank-8 LoRA on q/v of every layer, in the training format (for timing only)."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(cfg["num_hidden_layers"]):
        for m, fout in (("self_attn.q_proj", h), ("self_attn.v_proj", kv)):
            t[f"model.layers.{i}.{m}.lora_a"] = rng.normal(0, h ** -0.5, (h, rank)).astype(np.float32)
            t[f"model.layers.{i}.{m}.lora_b"] = rng.normal(0, 0.01, (rank, fout)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "adapters.safetensors"))
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": cfg["num_hidden_layers"],
        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": keys}, "rank": rank,
        "alpha": 2.0 * rank, "scale": 2.0, "use_rslora": False, "use_dora": False, "target_modules": keys,
        "layers": list(range(cfg["num_hidden_layers"])), "base_model": str(model_dir), "format_version": 1}))
    return out


def time_stream(it, n: int) -> tuple[float, float]:
    """(ttft seconds, decode tok/s) of an iterator of tokens, read up to n."""
    t0 = time.perf_counter()
    t1, count = None, 0
    for _ in it:
        count += 1
        if t1 is None:
            t1 = time.perf_counter()
        if count >= n:
            break
    t2 = time.perf_counter()
    return t1 - t0, (count - 1) / (t2 - t1)


def bench_llama_raw(gguf: Path, prompt_text: str, n: int, threads: int):
    from mlx_qlora.model.llama_load import open_llama

    llm = open_llama(gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads)
    ids = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)

    def run():
        llm.reset()
        return time_stream(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0), n)
    return run


def bench_stock_mlx(model_dir: Path, prompt_text: str, n: int):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(model_dir))
    ids = mx.array(tok._tokenizer.encode(prompt_text, add_special_tokens=False))

    def run():
        return time_stream(generate_step(ids, model, max_tokens=n), n)
    return run


def bench_engine(engine, prompt_text: str, n: int, adapter: str | None = None):
    from mlx_qlora.infer.generate import SamplingConfig

    cfg = SamplingConfig(max_tokens=n, ignore_eos=True)
    ids = engine.encode(prompt_text)

    def run():
        engine.set_adapter(adapter)
        engine.reset()  # time the prompt too, not a cache hit
        list(engine.stream(ids, cfg))
        st = engine.stats
        return st.ttft_s, st.decode_tps
    return run


def interleaved_medians(runs: list, reps: int) -> list[tuple[float, float]]:
    """Median (ttft, tok/s) per run, the runs taken in turn (A B C A B C ...) so that a load
    change on a shared machine hits every row alike instead of skewing the ratios."""
    for run in runs:
        run()  # warm-up: first-call allocations, page faults
    results = [[] for _ in runs]
    for rep in range(reps):
        for i, run in enumerate(runs):
            results[i].append(run())
            print(f"  rep {rep + 1}: row {i + 1}: ttft {results[i][-1][0] * 1e3:.0f} ms, "
                  f"{results[i][-1][1]:.1f} tok/s", file=sys.stderr, flush=True)
    return [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for rs in results]


def switch_ms(engine, names: list[str], k: int = 20) -> float:
    times = []
    for i in range(k):
        times.append(engine.set_adapter(names[i % len(names)]))
    return statistics.median(times) * 1e3


def conversation_ttft(engine, turns: int = 5) -> list[tuple[int, float, int]]:
    """(prompt tokens, TTFT ms, cached tokens) per turn of one chat, 32-token answers."""
    from mlx_qlora.infer.generate import SamplingConfig

    engine.set_adapter(None)
    engine.reset()
    msgs, out = [], []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Tell me fact number {i + 1} about the ocean, in detail."})
        ids = engine.chat_prompt(msgs)
        reply = "".join(engine.stream(ids, SamplingConfig(max_tokens=32, ignore_eos=True)))
        msgs.append({"role": "assistant", "content": reply})
        out.append((len(ids), engine.stats.ttft_s * 1e3, engine.stats.reused_tokens))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mlx-model", type=Path, default=None, help="MLX model dir (default: convert the embedded GGUF)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF of the same model (default: embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the default engine (default: as chat picks them: idle cores now, at least 1)")
    ap.add_argument("--skip-stock", action="store_true", help="skip stock mlx-lm (slow on CPU)")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_qlora.infer.adapters import AdapterSpec
    from mlx_qlora.model.embedded import embedded_gguf_path
    from mlx_qlora.infer.engines import EngineConfig, load_engine
    from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine

    tmp_dir = tempfile.TemporaryDirectory(prefix="bench_decode_")
    tmp = Path(tmp_dir.name)
    gguf = args.gguf or embedded_gguf_path()
    model_dir = args.mlx_model
    if model_dir is None:
        from mlx_qlora.model.convert import ConvertConfig, run_convert

        model_dir = tmp / "smollm2_mlx"
        run_convert(ConvertConfig(source=str(gguf), out_dir=str(model_dir), q_group_size=32))
    adapter = AdapterSpec("bench", make_random_adapter(model_dir, tmp / "adapter"))
    adapter2 = AdapterSpec("bench2", make_random_adapter(model_dir, tmp / "adapter2", seed=1))
    # what `mlx_qlora chat MODEL_DIR --adapter ...` loads with no other flag
    dflt = load_engine(EngineConfig(model=str(model_dir), adapters=[f"bench={adapter.path}", f"bench2={adapter2.path}"],
                                    n_ctx=2048, threads=args.threads))
    default = dflt.name
    if default == "llama.cpp" and dflt.gguf_path.resolve() != gguf.resolve():
        print(f"note: the default engine runs {dflt.gguf_path}, the llama.cpp rows {gguf}", flush=True)
    lc = dflt if default == "llama.cpp" else LlamaCppEngine(gguf, [adapter, adapter2], n_ctx=2048,
                                                            n_threads=args.threads)
    threads = lc.n_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    prompt_text = lc.chat_text([{"role": "user", "content": PROMPT}])
    n = args.tokens
    print(f"device: {mx.default_device()}, {cores} cores, mlx_qlora's llama.cpp threads: {threads}, {n} tokens, "
          f"median of {args.reps}; model: {model_dir.name} / {gguf.name}; chat picks by default: {default}",
          flush=True)

    rows = [(f"llama.cpp (llama-cpp-python generate, all {cores} cores)", None,
             bench_llama_raw(gguf, prompt_text, n, cores))]
    if threads != cores:
        rows.append((f"llama.cpp (llama-cpp-python generate, {threads} thread{'s' * (threads > 1)})", None,
                     bench_llama_raw(gguf, prompt_text, n, threads)))
    rows += [(f"mlx_qlora engine llama.cpp ({threads} thread{'s' * (threads > 1)})", "llama.cpp",
              bench_engine(lc, prompt_text, n)),
             ("mlx_qlora engine llama.cpp + LoRA r8", None, bench_engine(lc, prompt_text, n, "bench"))]
    me = dflt if default == "mlx" else MLXEngine(model_dir, [adapter, adapter2])
    rows += [("mlx_qlora engine mlx (CPU rewrite)" if me.cpu_fast else "mlx_qlora engine mlx", "mlx",
              bench_engine(me, prompt_text, n)),
             ("mlx_qlora engine mlx + LoRA r8", None, bench_engine(me, prompt_text, n, "bench"))]
    if not args.skip_stock:
        rows.append(("stock mlx-lm (generate_step, 4-bit)", None, bench_stock_mlx(model_dir, prompt_text, n)))

    medians = interleaved_medians([run for _, _, run in rows], args.reps)
    results = [(label, kind, ttft, tps) for (label, kind, _), (ttft, tps) in zip(rows, medians)]
    base_tps = results[0][3]
    base_ttft = results[0][2]
    print("\n| engine | TTFT ms | decode tok/s | decode vs llama.cpp all cores | TTFT vs llama.cpp all cores | |")
    print("|---|---:|---:|---:|---:|---|")
    for label, kind, ttft, tps in results:
        mark = "default" if kind == default else ""
        print(f"| {label} | {ttft * 1e3:.0f} | {tps:.1f} | {tps / base_tps:.2f}x | {ttft / base_ttft:.2f}x | {mark} |")
    tps_default = next(tps for _, kind, _, tps in results if kind == default)
    print(f"\ndefault engine ({default}, no flag) vs llama.cpp with all {cores} cores, same GGUF: "
          f"{tps_default / base_tps:.2f}x decode (goal >= 0.9x)")

    print("\nadapter switch (median of 20, no reload):")
    for eng in (lc, me):
        print(f"  {eng.name:10s} {switch_ms(eng, ['bench', 'bench2', None]):.3f} ms")

    print(f"\none conversation on the default engine ({dflt.name}): TTFT per turn")
    for i, (p, ms, cached) in enumerate(conversation_ttft(dflt), 1):
        print(f"  turn {i}: prompt {p:4d} tokens ({cached:4d} from cache)  TTFT {ms:6.0f} ms")
    lc.close()
    tmp_dir.cleanup()


if __name__ == "__main__":
    main()
