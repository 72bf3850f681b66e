"""``mlx_qlora demo``: the pipeline end to end on the embedded SmolLM2-135M-Instruct.

Each stage calls the same function as its command, so the demo is the product as a user meets
it: convert the embedded GGUF (blocks kept exactly) -> QLoRA on a bundled WikiSQL sample ->
the base and the adapter answering the same question, switched without a reload -> a merged
Q4_1 GGUF (and an adapter-only one) answering through llama.cpp.
"""
from __future__ import annotations

from pathlib import Path

CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
# A held-out WikiSQL question (test.jsonl, first row): the adapter should answer with SQL.
SQL_PROMPT = ("table: 1-10015132-16\ncolumns: Player, No., Nationality, Position, Years in Toronto, "
              "School/Club Team\nQ: What is terrence ross' nationality\nA: ")
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "wikisql"


def _stage(title: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]{title}")


def _complete(engine, prompt: str, max_tokens: int = 48) -> str:
    """Greedy raw-text continuation up to the end of the line (WikiSQL answers are one line)."""
    from .infer.generate import SamplingConfig

    return engine.generate(engine.encode(prompt), SamplingConfig(max_tokens=max_tokens), stop=("\n",)).strip()


def run_demo(out_dir: str | Path = "demo_out", steps: int = 60, data: str | Path | None = None) -> dict:
    """Run every stage into ``out_dir``; returns what each produced (paths, losses, answers)."""
    from .export import ExportConfig, run_export
    from .infer.engines import EngineConfig, load_engine
    from .infer.generate import SamplingConfig
    from .model.convert import ConvertConfig, run_convert
    from .train.config import load_config
    from .train.loop import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, adapter = out / "smollm2-mlx", out / "adapter-wikisql"
    result: dict = {"base": str(base), "adapter": str(adapter)}

    _stage("1. convert the embedded SmolLM2 GGUF to MLX (Q4_1 blocks kept exactly)")
    run_convert(ConvertConfig(source=None, out_dir=str(base), force=True))

    _stage(f"2. QLoRA: rank 8 on all linear layers of the last 16 blocks, {steps} steps of WikiSQL")
    summary = train(load_config(None, {
        "model": str(base), "out_dir": str(adapter), "steps": steps, "batch_size": 4,
        "eval_every": max(1, steps // 3), "eval_batches": 0, "checkpoint_every": 0,
        "data": {"train": str(data or SAMPLE_DATA), "max_seq_len": 256},
        "lora": {"rank": 8, "alpha": 16, "layers": "last 16"},
        "optim": {"learning_rate": 3e-4, "warmup_steps": min(10, steps - 1)},
    }))
    result["train"] = summary

    _stage("3. the same question to the base and to the adapter, switched without a reload")
    merged_gguf, lora_gguf = out / "smollm2-wikisql.q4_1.gguf", out / "adapter-wikisql.gguf"
    run_export(ExportConfig(model=str(base), adapter=str(adapter), adapter_only=True, out=str(lora_gguf),
                            force=True))
    # as `mlx_qlora chat DIR` does: on a CPU the default runs llama.cpp on the GGUF convert recorded
    engine = load_engine(EngineConfig(model=str(base), adapters=[f"sql={lora_gguf}"]))
    print(f"engine: {engine.name}" + (f" ({engine.gguf_path.name})" if engine.name == "llama.cpp" else ""))
    result["engine"] = engine.name
    answers = {}
    for name in (None, "sql"):
        took = engine.set_adapter(name)
        answers[name or "base"] = _complete(engine, SQL_PROMPT)
        print(f"[{name or 'base'}] (switch {took * 1e3:.2f} ms)  {SQL_PROMPT.splitlines()[2]}\n  A: "
              f"{answers[name or 'base']}")
    engine.set_adapter(None)
    chat = engine.generate(engine.chat_prompt([{"role": "user", "content": CHAT_PROMPT}]),
                           SamplingConfig(max_tokens=32)).strip()
    print(f"[base, chat] {CHAT_PROMPT}\n  {chat}")
    engine.close()
    result["answers"] = answers

    _stage("4. export the fine-tuned model as one Q4_1 GGUF and answer through llama.cpp")
    run_export(ExportConfig(model=str(base), adapter=str(adapter), out=str(merged_gguf), force=True))
    merged = load_engine(EngineConfig(model=str(merged_gguf), engine="llama.cpp"))
    result["exported_answer"] = _complete(merged, SQL_PROMPT)
    print(f"llama.cpp ({merged_gguf.name}): {SQL_PROMPT.splitlines()[2]}\n  A: {result['exported_answer']}")
    merged.close()
    result["gguf"] = str(merged_gguf)
    return result
