"""``mlx_qlora demo``: the pipeline end to end on the embedded SmolLM2-135M-Instruct.

Each stage is the same function its command calls, so the demo is a smoke test of the product
as a user meets it: convert the embedded GGUF (blocks kept exactly), then answer a prompt.
"""
from __future__ import annotations

from pathlib import Path

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _stage(title: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]{title}")


def run_demo(out_dir: str | Path = "demo_out") -> dict:
    """Run every stage into ``out_dir``; returns what each produced (paths, answers)."""
    import mlx.core as mx

    from . import model_io
    from .convert import ConvertConfig, run_convert

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "smollm2-mlx"
    _stage("1. convert the embedded SmolLM2 GGUF to MLX (Q4_1 blocks kept exactly)")
    run_convert(ConvertConfig(source=None, out_dir=str(base), force=True))

    _stage("2. answer a prompt with the converted model")
    model, tokenizer = model_io.load(base, dtype=mx.float32)
    answer = greedy_answer(model, tokenizer, DEMO_PROMPT)
    print(f"Q: {DEMO_PROMPT}\nA: {answer}")
    return {"base": str(base), "answer": answer}


def greedy_answer(model, tokenizer, prompt: str, max_tokens: int = 32) -> str:
    """Greedy reply to one user message, via mlx-lm's generator."""
    from mlx_lm import generate

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return generate(model, tokenizer, text, max_tokens=max_tokens, verbose=False).strip()
