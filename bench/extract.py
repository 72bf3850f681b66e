"""Reviews -> JSON at scale: what a user would write with llama-cpp-python vs ``mlx_qlora extract``.

The issue's must-show table, measured side by side in one process (one machine, one load):

(a) the anchor: one ``Llama``, ``create_chat_completion`` per review with the schema as
    ``response_format`` ({"type": "json_object", "schema": ...}), greedy, one review at a time
    (on ``--anchor-model``, default ``--model-before`` or ``--model``: a JSON-writing model).
(before) ``extract`` as it was before issue #26 (``--model-before``): JSON answers, ``--parallel 8``,
    ``--drafts off``, each new row's prompt in a call of its own (``prefill="own"``).
(now) ``extract`` at its best on this CPU (``--model``): ``--parallel`` rows, prompts batched into
    the steps (``--prefill``, default ExtractConfig's), ``--answer`` passed through when given.

Each extract run prints rows/s, tokens per row (in / out; evaluated: prompt + forced + drafted +
sampled + thrown away), the ratio to (a), the cost of a million reviews at --price-per-hour next to
API list prices (recipes/api_prices.json), and how many rows are identical to plain greedy decoding
of the same model and answer form (``--parallel 1``, prompts alone, no drafts; ``--no-check``
skips those runs).

Threads: by default each side as its user would run it — (a) with llama-cpp-python's default
(``n_threads`` = half the cores: 1 on a 2-core box), extract with its own (the idle cores) — and
``--anchor-all-cores`` adds (a) again with every core. ``--threads N`` pins both sides to N.
``--drafts schema,all`` adds (now) with those drafts; ``--gguf-types f16,q8_0`` adds (now) on the
model rewritten to each type (llama.cpp's quantizer, requantizing: the same weights, the type's
speed); ``--repeat K`` interleaves every extract config K times and keeps the fastest of each.

llama.cpp's extra buffer types (the AMX path on Intel Xeons, model/llama_load.py) follow
``open_llama``'s choice on every side unless ``--main-bufts off``: then (a) and (before) run with them
off, as main ran on an AMX CPU before ``scripts/llama_cpp_wheel.py`` (pip's build crashed with them).
``--bufts-off-row`` adds (now) with them off, which isolates what the AMX path gives.

    .venv/bin/python bench/extract.py --model-before runs/reviews-q4_1.gguf \
        --model runs/reviews-compact-q8_0.gguf --answer compact --rows 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@contextmanager
def extra_bufts(setting: str | None):
    """llama.cpp's extra buffer types forced "on"/"off" for the loads inside (None: open_llama's choice)."""
    from mlx_qlora.model.llama_load import ENV_VAR

    old = os.environ.get(ENV_VAR)
    if setting is not None:
        os.environ[ENV_VAR] = {"on": "1", "off": "0"}[setting]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


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
    from mlx_qlora.model.llama_load import rewrite_gguf

    try:
        return str(rewrite_gguf(model, out_dir / f"{Path(model).stem}.{kind}.gguf", f"MOSTLY_{kind.upper()}"))
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def extract_once(path: str, inp: Path, out: Path, price: float, threads: int | None, max_tokens: int, **kw) -> dict:
    from mlx_qlora.apps.extract import ExtractConfig, run_extract

    with extra_bufts(kw.pop("bufts", None)):
        return run_extract(ExtractConfig(model=path, input=str(inp), output=str(out), threads=threads, progress=False,
                                         max_tokens=max_tokens, price_per_hour=price, **kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF of (now) (default: the embedded SmolLM2)")
    ap.add_argument("--model-before", default=None, help="GGUF of (before): the JSON model as main shipped it")
    ap.add_argument("--anchor-model", default=None, help="GGUF of (a) (default: --model-before, else --model)")
    ap.add_argument("--answer", default=None, help="(now) answer form, passed to ExtractConfig (e.g. compact)")
    ap.add_argument("--input", default=str(ROOT / "runs" / "mams" / "val_reviews.jsonl"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=None, help="(now) rows decoded together (default: extract's)")
    ap.add_argument("--prefill", default=None, help="(now) own | even | wave (default: extract's)")
    ap.add_argument("--span-fields", default="default",
                    help="(now) once per --span-field value, comma-separated: default (the schema's grounded "
                         "fields), none, or a field name; e.g. default,none")
    ap.add_argument("--threads", type=int, default=0, help="both sides (default: each side's own default)")
    ap.add_argument("--anchor-all-cores", action="store_true", help="also run (a) with every core")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--price-per-hour", type=float, default=None)
    ap.add_argument("--skip-anchor", action="store_true", help="only the extract runs")
    ap.add_argument("--no-check", action="store_true", help="skip the --parallel 1 runs that count identical rows")
    ap.add_argument("--repeat", type=int, default=1, help="run every extract config this many times, interleaved; "
                    "the fastest of each counts")
    ap.add_argument("--drafts", default="", help="also (now) with these --drafts, e.g. schema,all")
    ap.add_argument("--gguf-types", default="", help="also (now) on the model rewritten to these GGUF types, "
                    "e.g. f16,q8_0")
    ap.add_argument("--main-bufts", choices=["default", "off"], default="default",
                    help="(a) and (before) with llama.cpp's extra buffer types as open_llama chooses, or off (as main "
                         "ran on an AMX CPU)")
    ap.add_argument("--bufts-off-row", action="store_true", help="also (now) with llama.cpp's extra buffer types off")
    args = ap.parse_args()
    main_bufts = None if args.main_bufts == "default" else "off"
    bufts_note = "" if main_bufts is None else ", extra buffer types off"

    from mlx_qlora.apps.costs import cost_rows, default_price_per_hour
    from mlx_qlora.infer.schema_file import instruction_of, load_schema
    from mlx_qlora.model.embedded import embedded_gguf_path

    model = args.model or str(embedded_gguf_path())
    anchor_model = args.anchor_model or args.model_before or model
    schema = load_schema()
    rows = [json.loads(line) for line in open(args.input, encoding="utf-8")][:args.rows]
    price = default_price_per_hour() if args.price_per_hour is None else args.price_per_hour
    threads = args.threads or None
    print(f"{len(rows)} reviews, threads {args.threads or 'each side default'}, load {os.getloadavg()[0]:.2f}")

    rps_a = rps_all = None
    if not args.skip_anchor:
        print(f"(a) llama-cpp-python create_chat_completion on {Path(anchor_model).name}, one review at a time"
              f"{bufts_note}")
        with extra_bufts(main_bufts):
            ref, rps_a = anchor(anchor_model, rows, schema, instruction_of(schema), threads, args.max_tokens)
    if args.anchor_all_cores:
        print("(a') the same with every core")
        with extra_bufts(main_bufts):
            _, rps_all = anchor(anchor_model, rows, schema, instruction_of(schema), len(os.sched_getaffinity(0)),
                                args.max_tokens)

    now = {k: v for k, v in (("parallel", args.parallel), ("prefill", args.prefill), ("answer", args.answer))
           if v is not None}
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        configs = []    # (label, GGUF, ExtractConfig fields)
        if args.model_before:
            configs.append(("(before) extract as on main: JSON, --parallel 8, prompts alone" + bufts_note,
                            args.model_before, {"parallel": 8, "drafts": "off", "prefill": "own", "span_field": "none",
                                                "bufts": main_bufts}))
        for sf in args.span_fields.split(","):   # main had no grounded fields: (before) runs without
            configs.append(("(now) extract" + ("" if sf == "default" else f", --span-field {sf}"), model,
                            {**now, **({} if sf == "default" else {"span_field": sf})}))
        if args.bufts_off_row:
            configs.append(("(now) extract, extra buffer types off", model, {**now, "bufts": "off"}))
        for dr in filter(None, args.drafts.split(",")):
            configs.append((f"(now) --drafts {dr}", model, {**now, "drafts": dr}))
        for kind in filter(None, args.gguf_types.split(",")):
            configs.append((f"(now) as {kind.upper()}", requantize(model, kind.strip().lower(), Path(d)), dict(now)))
        # interleaved, each config's fastest run kept: on a shared box the load changes within minutes
        for rep in range(args.repeat):
            for label, path, kw in configs:
                print(f"{label}: {Path(path).name} {kw} (run {rep + 1})", flush=True)
                out = Path(d) / f"{len(runs)}-{rep}.jsonl"
                sm = extract_once(path, inp, out, price, threads, args.max_tokens, **kw)
                sm["load"] = os.getloadavg()[0]
                got = [json.loads(line) for line in open(out)]
                if label in runs:
                    assert got == runs[label][1], f"{label} gave other rows on run {rep + 1}"
                if label not in runs or sm["rows_per_s"] > runs[label][0]["rows_per_s"]:
                    runs[label] = sm, got, path, kw
        greedy = {}     # (GGUF, answer form) -> rows of plain greedy decoding
        if not args.no_check:
            for label, (sm, got, path, kw) in runs.items():
                key = (path, kw.get("answer"), kw.get("span_field"), kw.get("bufts"))
                if key not in greedy:
                    print(f"plain greedy decoding of {Path(path).name} (--parallel 1, prompts alone)", flush=True)
                    out = Path(d) / f"greedy-{len(greedy)}.jsonl"
                    plain = {k: kw[k] for k in ("answer", "span_field", "bufts") if k in kw}
                    extract_once(path, inp, out, price, threads, args.max_tokens, parallel=1, drafts="off",
                                 prefill="own", **plain)
                    greedy[key] = [json.loads(line) for line in open(out)]
    table(rows, runs, greedy, rps_a, rps_all, price, cost_rows, bufts_note)
    if rps_a and "(now) extract" in runs and args.answer is None:
        same = sum(a == b.get("result") for a, b in zip(ref, runs["(now) extract"][1]))
        print(f"(now) same result as (a) on {same}/{len(rows)} rows (different templates and grammars: not the "
              f"same decoding)")


def table(rows, runs, greedy, rps_a, rps_all, price, cost_rows, note: str = "") -> None:
    from dataclasses import fields

    from mlx_qlora.apps.extract import ExtractConfig

    default = {f.name: f.default for f in fields(ExtractConfig)}
    base = rps_a or next(iter(runs.values()))[0]["rows_per_s"]
    usd = lambda rps: f"{1e6 / rps / 3600 * price:,.2f}"
    print(f"\n| run | rows/s | vs {'(a)' if rps_a else 'the first run'} | tokens per row in / out | evaluated per row: "
          f"prompt + forced + drafted + sampled + thrown away | rows = plain greedy | USD per 1M reviews | load |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    if rps_a:
        print(f"| (a) llama-cpp-python, one review at a time{note} | {rps_a:.2f} | 1.00x | | | | {usd(rps_a)} | |")
    if rps_all:
        print(f"| (a') the same, every core | {rps_all:.2f} | {rps_all / base:.2f}x | | | | {usd(rps_all)} | |")
    for label, (sm, got, path, kw) in runs.items():
        e = sm["evaluated_per_row"] or {}
        split = " + ".join(f"{e.get(k, 0):.1f}" for k in ("prompt", "forced", "drafted", "sampled", "rejected"))
        ref = greedy.get((path, kw.get("answer"), kw.get("span_field"), kw.get("bufts")))
        same = f"{sum(a == b for a, b in zip(got, ref))}/{len(rows)}" if ref is not None else "-"
        print(f"| {label} ({Path(path).name}{', ' + kw['answer'] if 'answer' in kw else ''}, --parallel "
              f"{kw.get('parallel', default['parallel'])}, prefill {kw.get('prefill', default['prefill'])}) | {sm['rows_per_s']:.2f} | {sm['rows_per_s'] / base:.2f}x | "
              f"{sm['tokens_in']:.1f} / {sm['tokens_out']:.1f} | {split} = {e.get('total', 0):.1f} | {same} | "
              f"{usd(sm['rows_per_s'])} | {sm['load']:.1f} |")
    # an API writes the JSON: the first run's tokens ((before) when given: JSON answers)
    js = next(iter(runs.values()))[0]
    for who, cost in cost_rows(js["rows_per_s"], js["tokens_in"], js["tokens_out"], price)[1:]:
        print(f"| API {who} ({js['tokens_in']:.0f} in / {js['tokens_out']:.0f} out tokens per review) "
              f"| | | | | | {cost:,.2f} | |")
    print(f"\nprice ${price}/h; a million reviews a day is 11.6 rows/s")


if __name__ == "__main__":
    main()
