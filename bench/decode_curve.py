"""Evaluated tokens/s of one llama.cpp context as a function of the shape of a ``llama_decode`` call.

A call of S sequences x T tokens each, in one context with one KV stream per sequence (as
``BatchDecoder`` builds it: ``kv_unified`` off, the shared prefix evaluated once on sequence 0
and copied to every stream), timed on ``llama_decode`` alone. llama.cpp splits a multi-sequence
call into micro-batches of equal tokens per sequence, so an S x T call is one graph of S*T
tokens when S*T <= n_ubatch. Shapes:

- prompt-like: 1 x T (T = 8..512), what a prompt batch is;
- decode-like: S x 1 (S = 1..64), one token per generating row;
- rectangles S x T, several rows' prompts (or prompt pieces) in one call.

``--rows N`` then runs ``BatchDecoder`` itself over the first N reviews of ``--input`` (the
schema's chat prompts, the shared prefix evaluated once) with ``--max-tokens`` output tokens per row
(default 10: a compact answer's length; rows end at the cap) for each ``--configs`` entry
(``parallel:prefill``, see PREFILL in llamacpp_batch.py): rows/s, evaluated tok/s, llama_decode
calls per row, and how many rows wrote the tokens of ``--parallel 1`` (checked against a run at 1).

Each shape runs ``--calls`` calls in a row, every stream's positions going on from the prefix
(``--prefix`` tokens), so attention sees a row-like context (positions under 256: one 256-cell
KV window). The best of ``--repeat`` passes is printed, in tok/s and ms per call.

    flock /tmp/cpu-bench.lock .venv/bin/python bench/decode_curve.py --types q4_1,q8_0,f16
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [(1, t) for t in (8, 32, 64, 128, 512)]
DECODE = [(s, 1) for s in (1, 8, 16, 32, 64)]
RECTS = [(8, 8), (8, 32), (16, 16), (32, 8), (64, 4)]


def measure(llm, shapes, threads: int, prefix: int, calls: int, repeat: int, n_ubatch: int) -> dict:
    """{(S, T): (tok/s, ms per call)} on one context with max(S) + 1 streams."""
    import llama_cpp as lc
    from llama_cpp._utils import suppress_stdout_stderr

    n_seq = max(s for s, _ in shapes)
    per_seq = max(1024, -(-(prefix + max(t for _, t in shapes) * (calls + 1) + 16) // 256) * 256)   # + the warm-up call
    p = lc.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = per_seq * (n_seq + 1), 512, n_ubatch, n_seq + 1
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified, p.no_perf = False, True
    with suppress_stdout_stderr(disable=False):
        ctx = lc.llama_init_from_model(llm.model, p)
    mem = lc.llama_get_memory(ctx)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(llm.model))
    batch = lc.llama_batch_init(max(512, max(s * t for s, t in shapes)), 0, 1)

    def call(items):   # (token, pos, seq, logits)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        rc = lc.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode: {rc}"

    tok = lambda i: 100 + (i * 7919) % (n_vocab - 200)   # arbitrary ids, none special
    call([(tok(i), i, 0, False) for i in range(prefix)])
    out = {}
    for s, t in shapes:
        best = 0.0
        for _ in range(repeat):
            for seq in range(1, n_seq + 1):
                lc.llama_memory_seq_rm(mem, seq, -1, -1)
            for seq in range(1, s + 1):
                lc.llama_memory_seq_cp(mem, 0, seq, -1, -1)
            call([(tok(i), prefix + i, seq, i == t - 1) for seq in range(1, s + 1) for i in range(t)])  # warm
            t0 = time.perf_counter()
            for c in range(1, calls + 1):
                call([(tok(c * t + i), prefix + c * t + i, seq, i == t - 1)
                      for seq in range(1, s + 1) for i in range(t)])
            best = max(best, s * t * calls / (time.perf_counter() - t0))
        out[(s, t)] = best, 1000 * s * t / best
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    return out


def schedule(path: str, texts: list[str], configs: list[tuple[int, str]], threads: int, max_tokens: int):
    """{(parallel, prefill): (rows/s, evaluated tok/s, calls per row, rows = parallel 1)} for ``path``."""
    from mlx_qlora.apps.prompt import messages
    from mlx_qlora.infer.schema_file import instruction_of, load_schema
    from mlx_qlora.infer.engines import EngineConfig, load_engine
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder, Job, schema_to_gbnf
    from mlx_qlora.infer.generate import common_prefix

    schema = load_schema()
    eng = load_engine(EngineConfig(model=path, engine="llama.cpp", n_ctx=256, threads=threads))
    ins = instruction_of(schema)
    a, b = (eng.encode(eng.chat_text(messages(ins, t))) for t in ("a", "b"))
    prefix = a[:common_prefix(a, b)]
    prompts = [eng.chat_prompt(messages(ins, t)) for t in texts]
    gbnf = schema_to_gbnf(schema)

    def once(parallel, prefill):
        dec = BatchDecoder(eng.llm, gbnf, prefix, parallel=parallel, max_tokens=max_tokens, slot_tokens=512,
                           n_threads=threads, prefill=prefill)
        calls = [0]
        run = dec._run

        def counted(items):
            calls[0] += -(-len(items) // dec.n_batch)
            return run(items)
        dec._run = counted
        t0 = time.perf_counter()
        out = {j.key: list(j.tokens) for j in dec.run([Job(i, p) for i, p in enumerate(prompts)])}
        dt = time.perf_counter() - t0
        evaluated = dec.tokens_evaluated - len(prefix) + sum(map(len, out.values()))
        dec.close()
        return out, len(prompts) / dt, evaluated / dt, calls[0] / len(prompts)

    ref = once(1, "own")[0]
    res = {}
    for parallel, prefill in configs:
        out, rps, tps, cpr = once(parallel, prefill)
        res[(parallel, prefill)] = rps, tps, cpr, sum(out[k] == ref[k] for k in ref)
        print(f"    {Path(path).name} --parallel {parallel} prefill {prefill}: {rps:.2f} rows/s, {tps:.0f} tok/s, "
              f"{cpr:.2f} calls/row, {res[(parallel, prefill)][3]}/{len(ref)} rows = parallel 1; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    eng.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--types", default="", help="also the model rewritten to these GGUF types, e.g. q8_0,f16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prefix", type=int, default=80, help="tokens every stream starts from (the shared prefix)")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per shape")
    ap.add_argument("--repeat", type=int, default=2, help="passes per shape, the fastest kept")
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--shapes", default="prompt,decode,rect", help="which groups: prompt, decode, rect ('' = none)")
    ap.add_argument("--rows", type=int, default=0, help="also run BatchDecoder over this many reviews per config")
    ap.add_argument("--input", default=str(ROOT / "runs" / "mams" / "val_reviews.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--configs", default="8:own,16:own,32:own,64:own,32:even,32:wave,64:wave")
    args = ap.parse_args()

    from bench.extract import requantize
    from mlx_qlora.model.embedded import embedded_gguf_path
    from mlx_qlora.model.llama_load import open_llama

    model = args.model or str(embedded_gguf_path())
    groups = {"prompt": PROMPT, "decode": DECODE, "rect": RECTS}
    shapes = [sh for g in filter(None, args.shapes.split(",")) for sh in groups[g]]
    configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.configs.split(",")]
    texts = []
    if args.rows:
        import json

        texts = [json.loads(line)["text"] for line in open(args.input, encoding="utf-8")][:args.rows]
    print(f"model {model}, threads {args.threads}, prefix {args.prefix}, {args.calls} calls x best of "
          f"{args.repeat}, n_ubatch {args.n_ubatch}; load {os.getloadavg()[0]:.2f}")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        files = [("as given", model)] + [(k.upper(), requantize(model, k, Path(d)))
                                         for k in filter(None, args.types.split(","))]
        for name, path in files:
            if shapes:
                llm = open_llama(path, n_ctx=256, n_threads=args.threads, verbose=False)
                results[name] = measure(llm, shapes, args.threads, args.prefix, args.calls, args.repeat, args.n_ubatch)
                llm.close()
            if texts:
                schedule(path, texts, configs, args.threads, args.max_tokens)
            print(f"  {name} done, load {os.getloadavg()[0]:.2f}", flush=True)
    names = list(results)
    if not shapes:
        return
    print("\n| call shape (rows x tokens) | tokens per call | " + " | ".join(f"{n} tok/s (ms/call)" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for s, t in shapes:
        cells = " | ".join(f"{results[n][(s, t)][0]:.0f} ({results[n][(s, t)][1]:.1f})" for n in names)
        print(f"| {s} x {t} | {s * t} | {cells} |")
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
