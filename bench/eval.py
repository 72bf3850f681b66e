"""Scoring speed: ``mlx_qlora eval`` vs llama.cpp and stock mlx-lm perplexity-style scoring.

    python bench/eval.py                                   # embedded SmolLM2, WikiSQL test rows
    python bench/eval.py --mlx-model DIR --gguf FILE --data FILE.jsonl --rows 100 --reps 2

Every row scores the same token ids (the JSONL encoded once, as training encodes it) and the same
loss tokens, in the same batches:

- ``mlx_qlora eval``: ``eval.loss.MLXScorer`` (the training loss function without gradient: the
  NumPy engine's padding-free forward on CPU);
- ``llama.cpp``: ``eval.loss.LlamaCppScorer`` on the GGUF (logits_all, one row per decode);
- ``mlx-lm (stock)``: what ``mlx_lm.perplexity`` does per batch: ``model(inputs)`` on the
  quantized model as ``mlx_lm.load`` returns it, ``nn.losses.cross_entropy`` over the padded batch,
  the loss tokens picked out.

tok/s = input tokens through the model per second of scoring (loading excluded); the best of
``--reps`` runs, interleaved. The losses are printed too: the three must agree.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx_qlora  # noqa: E402,F401  (binds the fast BLAS before mlx.core)

ROOT = Path(__file__).resolve().parent.parent
WIKISQL_TEST = ROOT.parent / "shared" / "data" / "wikisql" / "test.jsonl"


class StockMLXScorer:
    """mlx_lm.perplexity's per-batch computation on the same padded batches."""

    engine = "mlx-lm (stock)"

    def __init__(self, model_dir: Path):
        from mlx_lm.utils import load

        self.model, self.tokenizer = load(str(model_dir))

    def __call__(self, batch) -> float:
        import mlx.core as mx
        import mlx.nn as nn

        logits = self.model(mx.array(batch.inputs)).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, mx.array(batch.targets), reduction="none")
        total = losses.reshape(-1)[mx.array(batch.loss_index)].sum()
        mx.eval(total)
        return total.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlx-model", type=Path, default=None, help="MLX model dir (default: embedded SmolLM2, converted)")
    ap.add_argument("--gguf", type=Path, default=None, help="its GGUF (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--data", type=Path, default=WIKISQL_TEST)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-stock", action="store_true", help="leave out the (slow) stock mlx-lm row")
    args = ap.parse_args()

    from mlx_qlora.eval.loss import LlamaCppScorer, MLXScorer, load_examples, score
    from mlx_qlora.model.embedded import embedded_gguf_path
    from mlx_qlora.train.config import DataConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench_eval_")
    model_dir = args.mlx_model
    if model_dir is None:
        from mlx_qlora.model.convert import ConvertConfig, run_convert

        model_dir = Path(tmp.name) / "smollm2"
        run_convert(ConvertConfig(source=None, out_dir=str(model_dir)))
    gguf = args.gguf or embedded_gguf_path()

    ours = MLXScorer(model_dir)
    examples = load_examples(DataConfig(train=str(args.data), max_seq_len=2048), ours.tokenizer, args.rows)
    n_ctx = max(len(e.tokens) for e in examples) + 1
    scorers = [ours, LlamaCppScorer(gguf, n_ctx=max(n_ctx, 64))]
    if not args.skip_stock:
        scorers.append(StockMLXScorer(model_dir))
    names = {id(ours): "mlx_qlora eval", id(scorers[1]): "llama.cpp", id(scorers[-1]): "mlx-lm (stock)"}
    best: dict[str, object] = {}
    for rep in range(args.reps):
        for s in scorers:
            r = score(examples, s, args.batch_size, s.engine)
            name = names[id(s)]
            if name not in best or r.seconds < best[name].seconds:
                best[name] = r
            print(f"  rep {rep + 1}: {name:15s} {r.tokens_per_s:8.1f} tok/s  loss {r.loss:.5f}", flush=True)

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"\n{len(examples)} rows of {args.data.name}, {best['llama.cpp'].tokens:,} tokens "
          f"({best['llama.cpp'].loss_tokens:,} loss tokens), batch {args.batch_size}; model {model_dir.name} "
          f"vs GGUF {gguf.name}; {os.cpu_count()} CPU cores, OPENBLAS_NUM_THREADS={threads}, "
          f"{scorers[1].engine}; best of {args.reps}\n")
    ref_ll, ref_stock = best["llama.cpp"], best.get("mlx-lm (stock)")
    head = "| system | engine | tok/s | seconds | loss (nats/token) | perplexity | vs llama.cpp |"
    head += " vs mlx-lm |" if ref_stock else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in best.items():
        line = (f"| {name} | {r.engine} | {r.tokens_per_s:,.1f} | {r.seconds:.1f} | {r.loss:.5f} | {r.perplexity:.4f} "
                f"| {r.tokens_per_s / ref_ll.tokens_per_s:.2f}x |")
        if ref_stock:
            line += f" {r.tokens_per_s / ref_stock.tokens_per_s:.2f}x |"
        print(line)
    tmp.cleanup()


if __name__ == "__main__":
    main()
