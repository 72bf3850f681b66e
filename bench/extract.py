"""Reviews -> JSON at scale: what a user would write with llama-cpp-python vs ``mlx_qlora extract``.

(a) the anchor: one ``Llama``, ``create_chat_completion`` per review with the schema as
    ``response_format`` ({"type": "json_object", "schema": ...}), greedy, one review at a time.
(b0) ``mlx_qlora extract`` (``--drafts off``, the default): the batched decoder, one token per
    row per step, on the same GGUF, the same rows, the same messages and schema.
(b) ``--drafts schema``: forced tokens drafted and checked in one step; (b+) ``--drafts all``
    (prompt lookup too).
Each extract run prints the tokens the model evaluated per row: prompt, forced (drafted from the
schema and kept), drafted (prompt lookup, kept), sampled (the model's own choices) and drafted
tokens thrown away, and the decode steps per row; (b) must give (b0)'s rows exactly.

Threads: by default each side as its user would run it — (a) with llama-cpp-python's default
(``n_threads`` = half the cores: 1 on a 2-core box), (b) with extract's (the idle cores) — and
``--anchor-all-cores`` adds (a) again with every core, the anchor at its fastest. ``--threads N``
pins both sides to N.

Both run in this process one after the other, so they see the same (possibly shared) machine.
Prints rows/s of each, the ratio, how many rows got the same result, and the cost of a million
reviews at --price-per-hour next to the API list prices (recipes/api_prices.json).

``--gguf-types f16,q8_0`` adds (b0) on the model rewritten to each type (llama.cpp's own quantizer,
requantizing: the weights stay those of the given GGUF, so it measures the speed of the type; a
fine-tuned model is exported to the type from its float weights): rows/s per type, and on how many
rows the answer matches the given GGUF's (b0).

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


def requantize(model: str, kind: str, out_dir: Path) -> str:
    """``model`` rewritten as GGUF type ``kind`` (f16, q8_0, q4_0, ...) by llama.cpp's quantizer."""
    import llama_cpp as lc

    p = lc.llama_model_quantize_default_params()
    p.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    p.allow_requantize = True
    out = out_dir / f"{Path(model).stem}.{kind}.gguf"
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):   # it logs every tensor
        rc = lc.llama_model_quantize(model.encode(), str(out).encode(), p)
    if rc != 0:
        raise SystemExit(f"llama.cpp could not write {kind} from {model} (code {rc})")
    return str(out)


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
    ap.add_argument("--skip-anchor", action="store_true", help="only the extract runs")
    ap.add_argument("--repeat", type=int, default=1, help="run every extract config this many times, interleaved; "
                    "the fastest of each counts")
    ap.add_argument("--gguf-types", default="", help="also run (b0) on the model rewritten to these GGUF types, "
                    "e.g. f16,q8_0")
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

    rps_a = None
    if not args.skip_anchor:
        print("(a) llama-cpp-python create_chat_completion, one review at a time, response_format schema")
        ref, rps_a = anchor(model, rows, schema, instruction_of(schema), args.threads or None, args.max_tokens)
    rps_all = None
    if args.anchor_all_cores:
        import os

        print("(a') the same with every core")
        ref_all, rps_all = anchor(model, rows, schema, instruction_of(schema), len(os.sched_getaffinity(0)),
                                  args.max_tokens)

    runs = {}
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        configs = [("b0", model, "off"), ("b", model, "schema"), ("b+", model, "all")]
        for kind in filter(None, args.gguf_types.split(",")):
            configs.append((kind.strip().upper(), requantize(model, kind.strip().lower(), Path(d)), "off"))
        # interleaved (b0, b, b+, types, b0, ...), each config's fastest run kept: on a shared box the
        # load changes within minutes, and a run the others did not share would decide the ratio
        for rep in range(args.repeat):
            for name, path, drafts in configs:
                print(f"({name}) mlx_qlora extract {Path(path).name} --parallel {args.parallel} --drafts {drafts} "
                      f"(run {rep + 1})")
                out = Path(d) / f"{name}-{rep}.jsonl"
                summary = run_extract(ExtractConfig(model=path, input=str(inp), output=str(out),
                                                    parallel=args.parallel, threads=args.threads or None,
                                                    progress=False, drafts=drafts, max_tokens=args.max_tokens,
                                                    price_per_hour=price))
                got = [json.loads(line) for line in open(out)]
                if name in runs:
                    assert got == runs[name][1], f"({name}) gave other rows on run {rep + 1}"
                if name not in runs or summary["rows_per_s"] > runs[name][0]["rows_per_s"]:
                    runs[name] = summary, got
        types = {name: runs.pop(name) for name, _, _ in configs[3:]}
    (s0, got0), (s1, got1), (s2, got2) = runs["b0"], runs["b"], runs["b+"]
    rps_b = s1["rows_per_s"]
    base = rps_a or s0["rows_per_s"]
    print()
    print("| run | rows/s | vs " + ("(a)" if rps_a else "(b0)") + " | tokens evaluated per row: prompt + forced + "
          "drafted + sampled + thrown away = total | decode steps per row | USD per 1M reviews |")
    print("|---|---:|---:|---|---:|---:|")
    if rps_a:
        print(f"| (a) llama-cpp-python, one at a time | {rps_a:.2f} | 1.00x | | | {1e6 / rps_a / 3600 * price:,.2f} |")
    if rps_all:
        print(f"| (a') the same, every core | {rps_all:.2f} | {rps_all / base:.2f}x | | | "
              f"{1e6 / rps_all / 3600 * price:,.2f} |")
    for name, (sm, _) in runs.items():
        e = sm["evaluated_per_row"]
        label = {"b0": "extract (--drafts off, one token per step)", "b": "extract --drafts schema",
                 "b+": "extract --drafts all (+ prompt lookup)"}[name]
        print(f"| ({name}) {label}, --parallel {args.parallel} | {sm['rows_per_s']:.2f} | {sm['rows_per_s'] / base:.2f}x | "
              f"{e['prompt']:.1f} + {e['forced']:.1f} + {e['drafted']:.1f} + {e['sampled']:.1f} + {e['rejected']:.1f} = "
              f"{e['total']:.1f} | {e['steps']:.1f} | {1e6 / sm['rows_per_s'] / 3600 * price:,.2f} |")
    for kind, (sm, got) in types.items():
        e = sm["evaluated_per_row"]
        same = sum(a == b for a, b in zip(runs["b0"][1], got))
        print(f"| (b0) on the model as {kind} (answers = (b0) on {same}/{len(rows)} rows) | {sm['rows_per_s']:.2f} | "
              f"{sm['rows_per_s'] / base:.2f}x | {e['prompt']:.1f} + {e['forced']:.1f} + {e['drafted']:.1f} + "
              f"{e['sampled']:.1f} + {e['rejected']:.1f} = {e['total']:.1f} | {e['steps']:.1f} | "
              f"{1e6 / sm['rows_per_s'] / 3600 * price:,.2f} |")
    for who, usd in cost_rows(s0["rows_per_s"], s0["tokens_in"], s0["tokens_out"], price)[1:]:
        print(f"| API {who} ({s0['tokens_in']:.0f} in / {s0['tokens_out']:.0f} out tokens per review) | | | | | {usd:,.2f} |")
    same_b, same_b2 = sum(a == b for a, b in zip(got0, got1)), sum(a == b for a, b in zip(got0, got2))
    print(f"\n(b) = (b0) on {same_b}/{len(rows)} rows, (b+) = (b0) on {same_b2}/{len(rows)} (whole output lines); "
          f"speed (b) / (b0) {rps_b / s0['rows_per_s']:.2f}x, (b+) / (b0) {s2['rows_per_s'] / s0['rows_per_s']:.2f}x; "
          f"price ${price}/h")
    if rps_a:
        same = sum(a == b.get("result") for a, b in zip(ref, got0))
        print(f"(b0) same result as (a) on {same}/{len(rows)} rows")


if __name__ == "__main__":
    main()
