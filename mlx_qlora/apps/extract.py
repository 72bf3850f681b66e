"""``mlx_qlora extract``: a model over a file of texts -> one schema-valid JSON result per row.

What the model writes (``--answer json | compact``) and which fields are copied from the text
(grounded: ``--span-field``, by default the schema's marked ones): ``answer.py``.

Input: JSONL (the text in ``--text-field``) or plain text (one text per line); blank lines are
skipped and rows are numbered by the lines that remain. Output: JSONL, line i = input row i plus
``"result"`` (valid against the schema, by construction) or ``"error"`` (for that row only: a
malformed line, a missing text field, a text too long, an output cut at ``--max-tokens``).

Speed: on llama.cpp ``BatchDecoder`` decodes ``--parallel`` rows together and evaluates the
shared prompt prefix once; on MLX rows run one after another with the prefix kept in the KV cache.
Durability: rows are written in input order, each appended and fsync'ed; a rerun counts the
complete lines already in the output (dropping a torn last line) and continues after them, so
Ctrl-C or kill -9 loses at most the rows in flight and never duplicates one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import require
from ..infer.generate import common_prefix
from ..infer.schema_file import load_schema
from .answer import Answer
from .costs import cost_rows, default_price_per_hour, load_prices
from .prompt import messages

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# --drafts: what the batched llama.cpp decoder drafts (infer/engines/drafts.py); every choice gives
# the same answers, only the work differs: "schema" = the schema's forced tokens split the way the
# model splits them (its habits over earlier rows); "all" adds prompt lookup (copies of the review).
# Off by default: on a 2-core AVX-512 CPU every evaluated token costs the same and a step's own cost
# is small, so the drafted tokens thrown away (+7% evaluated) cost more than the steps saved
# (10 -> 4.7 per row): 0.90x with drafts (bench/extract.py, README); drafts pay where a step costs
# more than its tokens (memory-bound decoding: GPUs, Metal)
DRAFTS = {"off": None, "schema": {"lookup": False}, "all": {}}
ANSWERS = ("json", "compact")
PREFILL = ("own", "even", "wave")  # = llamacpp_batch.PREFILL (that module imports llama_cpp)


@dataclass
class ExtractConfig:
    model: str | None                 # MLX dir, .gguf, or None/'smollm2' (the embedded model)
    input: str
    output: str
    adapter: str | None = None        # LoRA adapter directory (or LoRA GGUF)
    schema: str | None = None         # JSON schema file; default recipes/schemas/aspects.json
    text_field: str = "text"
    parallel: int = 32                # sequences decoded together (llama.cpp): 32 measured best on a
    #                                   2-core AVX-512 CPU (README, bench/decode_curve.py), = 64 within 1%
    price_per_hour: float | None = None  # USD/hour of the machine; None = the prices file's VM
    max_tokens: int = 512             # per row; a row cut here gets an error
    engine: str = "auto"
    gguf: str | None = None
    threads: int | None = None
    progress: bool = True
    span_field: str | None = None     # string fields of this name must be spans of the row's text;
    #                                   None: the schema's marked fields (answer.py); "none": none
    drafts: str = "off"               # llama.cpp drafts checked in one step: off | schema | all (DRAFTS)
    answer: str = "json"              # what the model writes: json | compact (compact.py)
    prefill: str = "own"              # where rows' prompts run in llama.cpp's steps (llamacpp_batch.PREFILL)

    def __post_init__(self):
        require(Path(self.input).is_file(), f"--input {self.input!r}: file not found")
        require(Path(self.input).resolve() != Path(self.output).resolve(),
                f"--output {self.output!r} is the input file; choose another output")
        require(isinstance(self.parallel, int) and 1 <= self.parallel <= 64,
                f"--parallel {self.parallel!r}: use an integer from 1 to 64")
        require(self.max_tokens >= 8, f"--max-tokens {self.max_tokens}: use at least 8")
        require(self.price_per_hour is None or self.price_per_hour >= 0,
                f"--price-per-hour {self.price_per_hour}: use a price >= 0 in USD per hour")
        require(bool(self.text_field), "--text-field: give the JSON key that holds the text, e.g. text")
        require(self.drafts in DRAFTS, f"--drafts {self.drafts!r}: use one of {', '.join(DRAFTS)}")
        require(self.answer in ANSWERS, f"--answer {self.answer!r}: use one of {', '.join(ANSWERS)}")
        require(self.prefill in PREFILL, f"prefill {self.prefill!r}: use one of {', '.join(PREFILL)}")


@dataclass
class Row:
    index: int
    data: dict                        # what the output line starts from
    text: str | None = None
    error: str | None = None


def read_rows(path: str | Path, text_field: str = "text") -> list[Row]:
    """The input's rows; problems of one row become that row's error, an empty file a UserError."""
    p = Path(path)
    lines = [(n, line) for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    require(bool(lines), f"--input {p}: no rows (the file is empty); give one JSON object or one text per line")
    is_jsonl = p.suffix.lower() in JSONL_SUFFIXES or (p.suffix.lower() != ".txt" and lines[0][1].lstrip().startswith("{"))
    rows = []
    for i, (n, line) in enumerate(lines):
        if not is_jsonl:
            rows.append(Row(i, {"text": line}, text=line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(i, {"line": n, "input": line}, error=f"line {n}: not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row(i, {"line": n, "input": obj}, error=f"line {n}: expected a JSON object, got {type(obj).__name__}"))
        elif not isinstance(obj.get(text_field), str) or not obj[text_field].strip():
            rows.append(Row(i, obj, error=f"line {n}: no text in field {text_field!r} (keys: {', '.join(obj) or 'none'}); "
                                          f"pass --text-field NAME"))
        else:
            rows.append(Row(i, obj, text=obj[text_field]))
    return rows


def resume_point(path: Path, total: int) -> int:
    """Complete lines already in ``path`` (a torn last line from a kill is cut off first)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    done = data.count(b"\n")
    require(done <= total, f"--output {path} has {done} rows but the input only {total}: it belongs to another "
                           f"input; choose another --output")
    return done


class OrderedWriter:
    """Appends rows in input order (buffering ones that finish early), fsync after each."""

    def __init__(self, path: Path, start: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")
        self.next, self.buf, self.written = start, {}, 0

    def put(self, index: int, obj: dict) -> None:
        self.buf[index] = obj
        while self.next in self.buf:
            self.f.write((json.dumps(self.buf.pop(self.next), ensure_ascii=False) + "\n").encode("utf-8"))
            self.f.flush()
            os.fsync(self.f.fileno())
            self.next += 1
            self.written += 1

    def close(self) -> None:
        self.f.close()


@dataclass
class Tally:
    rows: int = 0
    valid: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    decoded: int = 0                  # rows that went through the model
    extra: dict = field(default_factory=dict)


def judge(text: str, finish: str, validator, max_tokens: int, form=None) -> tuple[str, object]:
    """("result", obj) for schema-valid output, else ("error", message); with ``form`` (a
    ``CompactForm``) the output is its lines, expanded into the JSON first."""
    if finish == "length":
        return "error", f"output cut at --max-tokens {max_tokens} before the answer was complete; raise --max-tokens"
    # bytes that are not UTF-8 (an untrained model emits some) decode to U+FFFD, one per byte,
    # while the grammar counted them as fewer characters (maxLength): drop them
    text = text.replace("\ufffd", "")
    if form is not None:
        try:
            obj = form.to_json(text)
        except ValueError as e:
            return "error", f"model output is not in the compact form ({e})"
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return "error", f"model output is not JSON ({e.msg})"
    problems = sorted(validator.iter_errors(obj), key=str)
    if problems:
        return "error", f"model output does not match the schema: {problems[0].message}"
    return "result", obj


def _progress(enabled: bool, total: int, done: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), disable=not enabled)
    task = bar.add_task("rows", total=total, completed=done, rate="")
    return bar, task


def _decode_llamacpp(engine, rows, prompts, cfg, gbnf, prefix, on_row, answer: Answer):
    from ..infer.engines.drafts import Drafter
    from ..infer.engines.llamacpp import default_threads
    from ..infer.engines.llamacpp_batch import BatchDecoder, Job

    # compact answers: the drafts are the model's habits (and lookup), no schema-forced tokens
    # (those come from the JSON schema's layouts, drafts.py)
    drafter = Drafter(engine.llm, None if answer.form else answer.schema, **DRAFTS[cfg.drafts]) \
        if DRAFTS[cfg.drafts] is not None else None
    dec = BatchDecoder(engine.llm, gbnf, prefix, parallel=cfg.parallel, max_tokens=cfg.max_tokens,
                       slot_tokens=512, n_threads=cfg.threads or default_threads(), drafter=drafter,
                       prefill=cfg.prefill)
    try:
        if engine.active_adapter:
            dec.set_lora(engine._loras[engine.active_adapter])

        def jobs():  # lazily: a row's own grammar (grounded fields) is built when a slot takes it
            for row in rows:
                why = row.error or dec.check(prompts[row.index])
                own = None
                if not why and answer.grounded:
                    try:
                        own = answer.gbnf(row.text)
                    except ValueError as e:   # compact: no span of this text fits the field
                        why = str(e)
                if why:
                    on_row(row, None, None, why)
                    continue
                yield Job(row.index, prompts[row.index], gbnf=own,
                          schema=answer.row_schema(row.text) if own and not answer.form else None)

        by_index = {r.index: r for r in rows}
        for job in dec.run(jobs()):
            on_row(by_index[job.key], dec.text(job.tokens), job, None)
        return dec.tokens_evaluated, vars(dec.counts)
    finally:
        dec.close()


def _decode_mlx(engine, rows, prompts, cfg, answer: Answer, on_row):
    from ..infer.generate import SamplingConfig

    sampling = answer.sampling(SamplingConfig(temperature=0.0, max_tokens=cfg.max_tokens))
    evaluated = 0
    for row in rows:
        if row.error:
            on_row(row, None, None, row.error)
            continue
        if answer.grounded:
            try:
                answer.sampling(sampling, row.text)
            except ValueError as e:
                on_row(row, None, None, str(e))
                continue
        text = engine.generate(prompts[row.index], sampling)
        st = engine.stats
        evaluated += st.prompt_tokens - st.reused_tokens
        on_row(row, text, _MlxJob(st.generated_tokens, st.finish_reason), None)
    return evaluated, None


@dataclass
class _MlxJob:
    n_tokens: int
    finish: str

    @property
    def tokens(self):
        return range(self.n_tokens)


@dataclass
class Session:
    """What decoding rows needs, loaded once per process: one run, or one Ray worker (extract_ray)."""
    cfg: ExtractConfig
    answer: Answer                    # the schema, its answer form (json | compact) and grounded fields
    validator: object
    instruction: str
    gbnf: str | None                  # the schema's grammar (llama.cpp), None on MLX
    engine: object
    prefix: list                      # the tokens every row's prompt starts with


def prepare_answer(cfg: ExtractConfig) -> tuple[Answer, str | None]:
    """The job's answer form and its GBNF for llama.cpp (a bad schema or option: one line, before
    any model loads)."""
    answer = Answer.of(load_schema(cfg.schema), cfg.answer, cfg.span_field)
    if cfg.engine != "mlx" and importlib.util.find_spec("llama_cpp") is not None:
        return answer, answer.gbnf()
    return answer, None


def open_session(cfg: ExtractConfig, answer: Answer, gbnf: str | None) -> Session:
    """Load the model (and adapter) and find the shared prompt prefix."""
    import jsonschema

    from ..infer.engines import EngineConfig, load_engine

    engine = load_engine(EngineConfig(model=cfg.model, adapters=[f"adapter={cfg.adapter}"] if cfg.adapter else [],
                                      engine=cfg.engine, gguf=cfg.gguf, n_ctx=256, threads=cfg.threads))
    if engine.name != "llama.cpp":  # compile llguidance's grammar before any row runs
        from ..infer.generate import SamplingConfig
        from ..infer.structured import GuidanceConstraint
        GuidanceConstraint(engine._hf, answer.schema, len(engine._hf), engine.stop_ids, lark=answer.sampling(
            SamplingConfig()).grammar)
    if cfg.adapter:
        engine.set_adapter("adapter")
    instruction = answer.instruction()
    # the tokens every row's prompt starts with: what two different reviews' prompts share
    probe_a, probe_b = (engine.encode(engine.chat_text(messages(instruction, t))) for t in ("a", "b"))
    prefix = probe_a[:common_prefix(probe_a, probe_b)]
    return Session(cfg, answer, jsonschema.Draft202012Validator(answer.schema), instruction, gbnf, engine, prefix)


def decode_rows(s: Session, rows: list[Row], tally: Tally, put) -> tuple[int, dict | None]:
    """Decode ``rows`` (the whole job, or one shard) and ``put(index, line)`` each output line as it
    finishes; adds to ``tally``; returns (prompt tokens evaluated, the decoder's token counts)."""
    cfg = s.cfg
    prompts = {r.index: s.engine.chat_prompt(messages(s.instruction, r.text)) for r in rows if r.text is not None}

    def on_row(row: Row, text, job, error):
        line = dict(row.data)
        tally.rows += 1
        if error is None:
            kind, value = judge(text, job.finish, s.validator, cfg.max_tokens, s.answer.form)
            line[kind] = value
            tally.valid += kind == "result"
            tally.decoded += 1
            tally.tokens_in += len(prompts[row.index])
            tally.tokens_out += len(job.tokens)
        else:
            line["error"] = error
        put(row.index, line)

    if s.engine.name == "llama.cpp":
        return _decode_llamacpp(s.engine, rows, prompts, cfg, s.gbnf, s.prefix, on_row, s.answer)
    return _decode_mlx(s.engine, rows, prompts, cfg, s.answer, on_row)


def run_extract(cfg: ExtractConfig) -> dict:
    """Run the job, print the summary; returns its numbers (rows, valid, rows_per_s, costs...)."""
    answer, gbnf = prepare_answer(cfg)
    rows = read_rows(cfg.input, cfg.text_field)
    out = Path(cfg.output)
    done = resume_point(out, len(rows))
    price = default_price_per_hour() if cfg.price_per_hour is None else cfg.price_per_hour
    todo = rows[done:]
    session = open_session(cfg, answer, gbnf)
    engine = session.engine
    tally = Tally()
    writer = OrderedWriter(out, done)
    bar, task = _progress(cfg.progress, len(rows), done)
    t0 = time.perf_counter()

    def put(index: int, line: dict):
        writer.put(index, line)
        rate = tally.rows / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, completed=done + writer.written, rate=f"{rate:.2f} rows/s")

    try:
        with bar:
            evaluated, counts = decode_rows(session, todo, tally, put)
    except KeyboardInterrupt:
        writer.close()
        kept = out.read_bytes().count(b"\n")
        print(f"interrupted: {kept} of {len(rows)} rows are in {out}; "
              f"rerun the same command to continue")
        raise SystemExit(130) from None
    finally:
        writer.close()
        engine.close()
    elapsed = time.perf_counter() - t0
    return summarize(cfg, out, len(rows), done, tally, elapsed, price, evaluated, engine.name, counts)


def evaluated_split(prompt: int, counts: dict, rows: int) -> dict:
    """Tokens the model evaluated per row, by kind (llama.cpp's batched decoder): the prompt (its
    shared prefix counted once per run), then per output token how it came -- drafted as forced by
    the schema and kept, drafted by lookup and kept, or chosen by the model where no draft was
    kept ("sampled") -- and the drafted tokens evaluated and thrown away."""
    n = max(rows, 1)
    split = {"prompt": prompt / n, "forced": counts["forced"] / n, "drafted": counts["lookup"] / n,
             "sampled": counts["sampled"] / n, "rejected": counts["rejected"] / n}
    split["total"] = sum(split.values())
    split["steps"] = counts["steps"] / n
    return split


def summarize(cfg, out: Path, total: int, skipped: int, tally: Tally, elapsed: float, price: float,
              evaluated: int, engine_name: str, counts: dict | None = None) -> dict:
    results = errors = 0
    for line in out.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        results += "result" in obj
        errors += "error" in obj
    n = max(tally.decoded, 1)
    tin, tout = tally.tokens_in / n, tally.tokens_out / n
    rps = tally.rows / elapsed if elapsed > 0 else 0.0
    prices = load_prices()
    costs = cost_rows(rps, tin, tout, price, prices)
    print(f"rows: {results + errors} of {total} in {out} ({tally.rows} this run, {skipped} from an earlier run)")
    print(f"valid: {100 * results / max(results + errors, 1):.1f}% ({results} results, {errors} errors)")
    print(f"tokens per row: {tin:.1f} in, {tout:.1f} out; prompt tokens computed this run: {evaluated} "
          f"({evaluated / n:.1f} per row, the shared prefix reused)")
    split = evaluated_split(evaluated, counts, tally.decoded) if counts is not None else None
    if split:
        print(f"tokens evaluated per row: {split['prompt']:.1f} prompt + {split['forced']:.1f} forced + "
              f"{split['drafted']:.1f} drafted (kept) + {split['sampled']:.1f} sampled + {split['rejected']:.1f} "
              f"drafted (thrown away) = {split['total']:.1f}; {split['steps']:.1f} decode steps per row"
              f" (--drafts {cfg.drafts})")
    print(f"speed: {rps:.2f} rows/s ({elapsed:.1f} s, {engine_name}, parallel {cfg.parallel if engine_name == 'llama.cpp' else 1})")
    print(f"cost per 1M rows (prices {prices.get('date', '?')}, {prices.get('source', '?')}):")
    for who, usd in costs:
        print(f"  {who:<28} ${usd:,.2f}")
    return {"rows": results + errors, "results": results, "errors": errors, "rows_per_s": rps,
            "tokens_in": tin, "tokens_out": tout, "evaluated": evaluated, "elapsed_s": elapsed,
            "costs": dict(costs), "engine": engine_name, "evaluated_per_row": split}
