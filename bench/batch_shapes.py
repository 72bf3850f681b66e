"""The micro-batches llama.cpp runs for each BatchDecoder schedule (no timing: a structure count).

Runs ``BatchDecoder`` on the tiny test model (its compute is negligible) over the real chat prompts
of ``--input`` (tokenized by ``--tokenizer-model``, ids folded into the tiny vocabulary) with each
row's output length taken from the gold answer of ``--answers`` (chat rows: the assistant turn's
tokens + the end token), and replays every ``llama_decode`` call through llama.cpp's equal split
for non-unified KV (``split_equal``, sequential: a micro-batch takes one run of consecutive sequence
ids and the same count from each). Prints, per ``parallel:prefill``: calls and micro-batches per
row, mean tokens per micro-batch, and the share of tokens in micro-batches of >= 32 tokens.

    .venv/bin/python bench/batch_shapes.py --tokenizer-model runs/reviews-compact-q8_0.gguf \\
        --answers runs/mams-compact/valid.jsonl --rows 200
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def split_equal(batch: list[int], n_ubatch: int) -> list[int]:
    """Micro-batch sizes llama.cpp makes of a call whose items belong to sequences ``batch``."""
    left = {}
    for s in batch:
        left[s] = left.get(s, 0) + 1
    order = list(dict.fromkeys(batch))     # sequences in the order their first item comes
    sizes = []
    while any(left.values()):
        chain = []
        for s in order:
            if left[s] and (not chain or s == chain[-1] + 1):
                chain.append(s)
        n = min(min(left[s] for s in chain), max(1, n_ubatch // len(chain)))
        for s in chain:
            left[s] -= n
        sizes.append(n * len(chain))
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-model", required=True, help="GGUF whose tokenizer and chat template make the prompts")
    ap.add_argument("--answers", required=True, help="chat JSONL (messages: system, user, assistant)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--configs", default="8:own,8:even,8:wave,16:own,16:even,16:wave,32:own,32:even,32:wave,"
                    "64:own,64:even,64:wave")
    args = ap.parse_args()

    import llama_cpp
    import tiny
    from mlx_qlora.infer.engines import EngineConfig, load_engine
    from mlx_qlora.infer.engines.llamacpp_batch import BatchDecoder, Job
    from mlx_qlora.infer.generate import common_prefix
    from mlx_qlora.model.llama_load import open_llama

    rows = [json.loads(line)["messages"] for line in open(args.answers, encoding="utf-8")][:args.rows]
    eng = load_engine(EngineConfig(model=args.tokenizer_model, engine="llama.cpp", n_ctx=256, threads=1))
    prompts = [eng.chat_prompt(m[:2]) for m in rows]
    lengths = [len(eng.encode(m[2]["content"])) + 1 for m in rows]
    a, b = prompts[0], prompts[1]
    prefix = a[:common_prefix(a, b)]
    eng.close()
    with tempfile.TemporaryDirectory() as d:
        model = tiny.write_gguf(tiny.write_hf_dir(Path(d) / "hf", arch="llama", seed=3), Path(d) / "t.gguf", "Q8_0")
        llm = open_llama(model, n_ctx=64, n_threads=1, verbose=False)
        fold = lambda ids: [1 + t % (llm.n_vocab() - 1) for t in ids]
        print(f"{len(rows)} rows: prompt {sum(map(len, prompts)) / len(rows):.1f} tokens ({len(prefix)} shared), "
              f"answer {sum(lengths) / len(rows):.1f} tokens + end")
        print("\n| --parallel | prefill | calls per row | micro-batches per row | tokens per micro-batch | "
              "tokens in micro-batches >= 32 |")
        print("|---:|---|---:|---:|---:|---:|")
        for spec in args.configs.split(","):
            parallel, prefill = int(spec.split(":")[0]), spec.split(":")[1]
            sizes, calls = [], [0]

            class Counting(BatchDecoder):
                def _take(self, slot, tok):   # the row ends at its gold answer's length
                    slot.job.tokens.append(tok)
                    return len(slot.job.tokens) >= lengths[slot.job.key]

            def counted(ctx, batch):
                calls[0] += 1
                sizes.extend(split_equal([batch.seq_id[i][0] for i in range(batch.n_tokens)], 512))
                return llama_cpp.llama_decode(ctx, batch)

            class LC:   # llama_cpp with llama_decode counted
                def __getattr__(self, name):
                    return counted if name == "llama_decode" else getattr(llama_cpp, name)

            dec = Counting(llm, 'root ::= [a-z]+', fold(prefix), parallel=parallel, max_tokens=64, slot_tokens=448,
                           prefill=prefill, n_batch=512)
            dec.lc = LC()
            done = sum(1 for _ in dec.run([Job(i, fold(p)) for i, p in enumerate(prompts)]))
            dec.close()
            n = len(rows)
            assert done == n
            big = sum(s for s in sizes if s >= 32) / sum(sizes)
            print(f"| {parallel} | {prefill} | {calls[0] / n:.2f} | {len(sizes) / n:.2f} | {sum(sizes) / len(sizes):.1f} | "
                  f"{100 * big:.0f}% |", flush=True)
        llm.close()


if __name__ == "__main__":
    main()
