"""Generation metrics: prompt each row, answer greedily, compare with the reference.

Prompts and references come from the rows: ``completions`` (prompt -> completion, rendered with
the chat template as training renders it), ``chat`` (everything before the last assistant
message -> that message) or ``text`` (cut after the last ``answer_prefix``; the prompt is the raw
text up to it, as the model saw it in training). Answers come from an ``infer`` engine: on CPU
llama.cpp (a GGUF is exported to a temporary file when the model directory has none; the adapter
is turned into a LoRA GGUF by the engine), MLX elsewhere or with ``--engine mlx``.

``exact-match``: the answer equals the reference after collapsing whitespace.
``json-fields``: ``json_fields.score_json_fields`` (validity, per-field accuracy, item P/R/F1); with
``answer: compact`` (rows from ``prepare-reviews --answer compact``) answers and references are
the compact lines, expanded into the schema's JSON before scoring (a malformed answer: invalid).
Both print the worst examples (least similar to their reference) at the end.
"""
from __future__ import annotations

import difflib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import require


@dataclass
class Item:
    line: int
    reference: str
    text: str | None = None            # raw prompt (text rows, or no chat template)
    messages: list | None = None       # chat prompt


def task_items(path: Path, data_cfg, task, say=print) -> list[Item]:
    """The prompt and reference of each row of ``path`` (the first ``task.max_rows``)."""
    from ..train.data import detect_format, read_jsonl

    rows = read_jsonl(path)
    if task.max_rows:
        rows = rows[:task.max_rows]
    fmt = detect_format(rows[0][1], data_cfg, f"{path} line {rows[0][0]}")
    items = []
    for n, row in rows:
        where = f"{path} line {n}"
        if fmt == "text":
            require(task.answer_prefix, f"{path} has text rows: give --answer-prefix (the text before each "
                                        "answer, e.g. 'A:') so the prompt and the reference can be told apart")
            text = row.get(data_cfg.text_key)
            require(isinstance(text, str), f"{where}: '{data_cfg.text_key}' must be a string")
            cut = text.rfind(task.answer_prefix)
            require(cut >= 0, f"{where}: no {task.answer_prefix!r} in the text; fix --answer-prefix")
            cut += len(task.answer_prefix)
            items.append(Item(n, text[cut:].strip(), text=text[:cut]))
        elif fmt == "completions":
            prompt, ref = row.get(data_cfg.prompt_key), row.get(data_cfg.completion_key)
            require(isinstance(prompt, str) and isinstance(ref, str),
                    f"{where}: '{data_cfg.prompt_key}' and '{data_cfg.completion_key}' must be strings")
            items.append(Item(n, ref.strip(), messages=[{"role": "user", "content": prompt}]))
        else:
            msgs = row.get(data_cfg.messages_key)
            require(isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs),
                    f"{where}: '{data_cfg.messages_key}' must be a list of {{role, content}} objects")
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            require(last is not None, f"{where}: no assistant message to compare with")
            items.append(Item(n, str(msgs[last].get("content", "")).strip(), messages=msgs[:last]))
    say(f"task: {len(items)} rows of {path} ({fmt})")
    return items


def _engine(cfg, tmp: Path, say):
    """An infer engine for the model (+ adapter, active): llama.cpp on CPU, MLX elsewhere."""
    from ..infer.engines import EngineConfig, load_engine, resolve

    adapters = [f"task={cfg.adapter}"] if cfg.adapter else []
    ecfg = EngineConfig(model=cfg.model, adapters=adapters, engine=cfg.engine)
    if cfg.engine != "mlx" and not cfg.model.endswith(".gguf"):
        import importlib.util

        import mlx.core as mx

        model_dir, gguf = resolve(ecfg)
        cpu = mx.default_device().type == mx.DeviceType.cpu
        if gguf is None and importlib.util.find_spec("llama_cpp") and (cpu or cfg.engine == "llama.cpp"):
            from ..export import ExportConfig
            from ..export.gguf import export_merged_gguf

            out = tmp / "model.gguf"
            export_merged_gguf(ExportConfig(model=cfg.model, out=str(out), modelfile=False))
            say(f"task: llama.cpp engine on a GGUF of {model_dir} (exported to a temporary file)")
            ecfg.gguf = str(out)
    engine = load_engine(ecfg)
    if cfg.adapter:
        engine.set_adapter("task")
    return engine


def _compact_form(task):
    """The CompactForm of a json-fields task whose rows answer in the compact form, else None."""
    if task.type != "json-fields" or task.answer != "compact":
        return None
    from ..infer.compact import CompactForm
    from ..infer.schema_file import load_schema, unmarked

    return CompactForm.from_schema(unmarked(load_schema(task.schema)))


def _expand(form, text: str) -> dict | None:
    """Compact lines -> the schema's JSON object (None when malformed: counted as invalid)."""
    try:
        text = text.rstrip()                  # not the first line's leading space (compact.LEAD)
        return form.to_json(text + "\n" if text.strip() else "")
    except ValueError:
        return None


def exact(answer: str, reference: str) -> bool:
    return " ".join(answer.split()) == " ".join(reference.split())


def similarity(answer: str, reference: str) -> float:
    return difflib.SequenceMatcher(None, answer, reference, autojunk=False).ratio()


def evaluate_task(cfg, say=print) -> dict:
    """Generate greedily for every row, score with the task's metric, print the worst answers."""
    from ..infer.generate import SamplingConfig
    from .json_fields import parse_prediction, score_json_fields

    task = cfg.task_cfg
    form = _compact_form(task)
    items = task_items(Path(cfg.data_cfg.train), cfg.data_cfg, task, say)
    answers: list[str] = []
    n_gen = 0
    with tempfile.TemporaryDirectory(prefix="mlx_qlora_eval_") as tmp:
        engine = _engine(cfg, Path(tmp), say)
        try:
            t0 = time.perf_counter()
            step = max(1, len(items) // 10)
            for k, it in enumerate(items):
                # compact answers are lines: only the end of generation ends one
                stop = task.stop if task.stop is not None else (["\n"] if "\n" not in it.reference and not form else [])
                prompt = engine.encode(it.text) if it.text is not None else engine.chat_prompt(it.messages)
                sampling = SamplingConfig(temperature=0.0, max_tokens=task.max_tokens, seed=0)
                answers.append(engine.generate(prompt, sampling, tuple(stop)).strip())
                n_gen += engine.stats.generated_tokens
                if (k + 1) % step == 0 or k + 1 == len(items):
                    so_far = sum(exact(a, i.reference) for a, i in zip(answers, items))
                    say(f"  {k + 1}/{len(items)} rows, exact match {100 * so_far / (k + 1):.1f}% so far")
            seconds = time.perf_counter() - t0
            engine_name = engine.name
        finally:
            engine.close()
    refs = [i.reference for i in items]
    hits = [exact(a, r) for a, r in zip(answers, refs)]
    result = {"task": task.type, "rows": len(items), "engine": engine_name, "seconds": seconds,
              "generated_tokens": n_gen, "gen_tokens_per_s": n_gen / seconds if seconds else 0.0,
              "exact_match": sum(hits) / len(items)}
    what = f"{cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "")
    say(f"{what}, {task.type} on {len(items)} rows of {cfg.data_cfg.train} (greedy, {engine_name}, "
        f"{seconds:.0f} s, {result['gen_tokens_per_s']:.0f} generated tok/s):")
    if task.type == "json-fields":
        scored = (answers, refs) if form is None else \
            ([_expand(form, a) for a in answers], [_expand(form, r) for r in refs])
        scores = score_json_fields(*scored, list_field=task.list_field, key=task.key, label=task.label)
        result.update(scores)
        fields = ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores["field_accuracy"].items())
        say(f"  JSON valid {100 * scores['json_validity']:.1f}%   {task.key} P/R/F1 "
            f"{scores['term_precision']:.3f}/{scores['term_recall']:.3f}/{scores['term_f1']:.3f}   "
            f"({task.key}, {task.label}) F1 {scores['pair_f1']:.3f}   exact {100 * result['exact_match']:.1f}%")
        say(f"  per-field accuracy: {fields or 'no fields'}")
        badness = [0.0 if (parse_prediction(a) if form is None else _expand(form, a)) is None else similarity(a, r)
                   for a, r in zip(answers, refs)]
    else:
        say(f"  exact match {100 * result['exact_match']:.1f}% ({sum(hits)}/{len(items)})")
        badness = [similarity(a, r) for a, r in zip(answers, refs)]
    worst = sorted((k for k in range(len(items)) if not hits[k]), key=lambda k: badness[k])[:task.show]
    if worst:
        say(f"  worst {len(worst)} (least similar to the reference):")
    for k in worst:
        say(f"    line {items[k].line}: expected {refs[k][:160]!r}\n{'':14}got {answers[k][:160]!r}")
    result["examples"] = [{"line": i.line, "reference": r, "answer": a, "exact": h}
                          for i, r, a, h in zip(items, refs, answers, hits)]
    return result
