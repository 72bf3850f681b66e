"""Reviews -> JSON at scale: what a user would write with llama-cpp-python vs ``mlx_qlora extract``.

(a) the anchor: one ``Llama``, ``create_chat_completion`` per review with the schema as
    ``response_format`` ({"type": "json_object", "schema": ...}), greedy, one review at a time.
(b) ``mlx_qlora extract`` on the same GGUF, the same rows, the same messages and schema.

Threads: by default each side as its user would run it — (a) with llama-cpp-python's default
(``n_threads`` = half the cores: 1 on a 2-core box), (b) with extract's (the idle cores) — and
``--anchor-all-cores`` adds (a) again with every core, the anchor at its fastest. ``--threads N``
pins both sides to N.

Both run in this process one after the other, so they see the same (possibly shared) machine.
Prints rows/s of each, the ratio, how many rows got the same result, and the cost of a million
reviews at --price-per-hour next to the API list prices (recipes/api_prices.json).

    .venv/bin/python bench/extract.py --model runs/eval11/reviews-q4_1.gguf --rows 200
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def anchor(model: str, rows: list[dict], schema: dict, instruction: str, threads: int | None, max_tokens: int):
    from mlx_qlora.model.llama_load import open_llama

    from mlx_qlora.apps.prompt import messages

    kw = {"n_threads": threads, "n_threads_batch": threads} if threads else {}   # else the library's default
    llm = open_llama(model, n_ctx=2048, **kw)
    print(f"  (a) n_threads {llm.n_threads}", flush=True)
    out, t0 = [], time.perf_counter()
    for i, r in enumerate(rows):
        resp = llm.create_chat_completion(messages=messages(instruction, r["text"]), temperature=0.0,
                                          max_tokens=max_tokens, response_format={"type": "json_object", "schema": schema})
        try:
            out.append(json.loads(resp["choices"][0]["message"]["content"]))
        except json.JSONDecodeError:
            out.append(None)
        if (i + 1) % 20 == 0:
            print(f"  (a) {i + 1}/{len(rows)} rows, {(i + 1) / (time.perf_counter() - t0):.2f} rows/s", flush=True)
    elapsed = time.perf_counter() - t0
    llm.close()
    return out, len(rows) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--input", default=str(ROOT / "runs" / "mams" / "val_reviews.jsonl"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="both sides (default: each side's own default)")
    ap.add_argument("--anchor-all-cores", action="store_true", help="also run (a) with every core")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--price-per-hour", type=float, default=None)
    args = ap.parse_args()

    from mlx_qlora.apps.costs import cost_rows, default_price_per_hour
    from mlx_qlora.apps.extract import ExtractConfig, run_extract
    from mlx_qlora.apps.prompt import instruction_of, load_schema
    from mlx_qlora.model.embedded import embedded_gguf_path

    model = args.model or str(embedded_gguf_path())
    schema = load_schema()
    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")][:args.rows]
    price = default_price_per_hour() if args.price_per_hour is None else args.price_per_hour
    print(f"model {model}, {len(rows)} reviews, threads {args.threads or 'each side default'}")

    print("(a) llama-cpp-python create_chat_completion, one review at a time, response_format schema")
    ref, rps_a = anchor(model, rows, schema, instruction_of(schema), args.threads or None, args.max_tokens)
    rps_all = None
    if args.anchor_all_cores:
        import os

        print("(a') the same with every core")
        ref_all, rps_all = anchor(model, rows, schema, instruction_of(schema), len(os.sched_getaffinity(0)),
                                  args.max_tokens)

    print(f"(b) mlx_qlora extract --parallel {args.parallel}")
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = run_extract(ExtractConfig(model=model, input=str(inp), output=str(Path(d) / "out.jsonl"),
                                            parallel=args.parallel, threads=args.threads or None, progress=False,
                                            max_tokens=args.max_tokens, price_per_hour=price))
        got = [json.loads(line).get("result") for line in open(Path(d) / "out.jsonl")]
    rps_b = summary["rows_per_s"]
    same = sum(a == b for a, b in zip(ref, got))
    print()
    print("| run | rows/s | vs (a) | USD per 1M reviews |")
    print("|---|---:|---:|---:|")
    print(f"| (a) llama-cpp-python, one at a time | {rps_a:.2f} | 1.00x | {1e6 / rps_a / 3600 * price:,.2f} |")
    if rps_all:
        print(f"| (a') the same, every core | {rps_all:.2f} | {rps_all / rps_a:.2f}x | {1e6 / rps_all / 3600 * price:,.2f} |")
    vs_all = f" ({rps_b / rps_all:.2f}x (a'))" if rps_all else ""
    print(f"| (b) mlx_qlora extract --parallel {args.parallel} | {rps_b:.2f} | {rps_b / rps_a:.2f}x{vs_all} | "
          f"{1e6 / rps_b / 3600 * price:,.2f} |")
    for who, usd in cost_rows(rps_b, summary["tokens_in"], summary["tokens_out"], price)[1:]:
        print(f"| API {who} ({summary['tokens_in']:.0f} in / {summary['tokens_out']:.0f} out tokens per review) | | | {usd:,.2f} |")
    print(f"\nsame result on {same}/{len(rows)} rows; price ${price}/h")


if __name__ == "__main__":
    main()
