"""Stage ``export``: ``mlx_qlora export`` and ``fuse``.

An MLX model (optionally + adapter) -> GGUF for llama.cpp (``gguf`` with ``blocks`` and ``vocab``,
the one GGUF writer, merged or adapter-only, plus an Ollama ``modelfile``), the adapter ->
Hugging Face PEFT and back (``peft``), and ``fuse`` (an adapter merged into its base, re-quantized).
Every output file appears only when complete (temp file, then rename).

May import: ``train`` (the adapter reader), ``model`` and the leaves. Never ``infer``, ``eval``
or ``apps``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, require

TARGETS = ("gguf", "peft")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


@dataclass
class ExportConfig:
    model: str                      # MLX model directory (the base, when an adapter is given)
    out: str                        # GGUF file, or PEFT directory
    to: str = "gguf"
    type: str | None = None         # GGUF tensor type; None: q4_1 for a 4-bit model, else f16
    adapter: str | None = None      # LoRA adapter directory: merged in, or exported alone
    adapter_only: bool = False      # GGUF: write a llama.cpp LoRA adapter file (use with --lora)
    base_gguf: str | None = None    # adapter-only: the base GGUF the Modelfile's FROM names
    modelfile: bool = True          # GGUF: write an Ollama Modelfile beside the file
    force: bool = False

    def __post_init__(self):
        require(self.to in TARGETS, f"--to {self.to} is not supported; use one of {', '.join(TARGETS)}")
        require(self.type is None or self.type in GGUF_TYPES,
                f"--type {self.type} is not supported; use one of {', '.join(GGUF_TYPES)}")
        require(bool(self.out), "an output path is required: pass -o FILE")
        require(not self.adapter_only or self.adapter,
                "--adapter-only needs --adapter DIR (the adapter to export)")
        require(self.to != "peft" or self.adapter, "--to peft exports an adapter: pass --adapter DIR")
        require(self.to != "gguf" or self.out.endswith(".gguf"),
                f"-o {self.out} should end in .gguf (llama.cpp and Ollama go by the name)")


@dataclass
class ExportReport:
    """What became of each tensor; printed at the end and returned to API callers."""

    out: str
    kind: str                                              # "merged GGUF", "LoRA GGUF", "PEFT"
    tensors: list[tuple[str, str, str, float]] = field(default_factory=list)  # name, type, how, rel err
    size_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ggml_type: str, how: str, err: float = 0.0) -> None:
        self.tensors.append((name, ggml_type, how, err))

    def lines(self) -> list[str]:
        out = [f"wrote {self.kind} {self.out} ({self.size_bytes / 2**20:.1f} MiB, {len(self.tensors)} tensors)"]
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for name, t, how, err in self.tensors:
            groups[(how, t)].append((name, err))
        label = {"exact": "copied exactly (same codes, scales, biases)",
                 "fp16 scales": "same codes, scales/biases rounded to fp16",
                 "requantized": "re-quantized", "float": "float"}
        for (how, t), items in sorted(groups.items()):
            errs = [e for _, e in items]
            err = f", max relative RMS error {max(errs):.3e}" if max(errs) > 0 else ""
            out.append(f"  {len(items):4d} {t:5s} {label.get(how, how)}{err}: {_compress([n for n, _ in items])}")
        return out + [f"  {n}" for n in self.notes]


def _compress(names: list[str]) -> str:
    """'blk.0.attn_q.weight', 'blk.1.attn_q.weight' -> 'blk.*.attn_q' (keeps the line short)."""
    seen = []
    for n in names:
        parts = n.removesuffix(".weight").split(".")
        key = ".".join("*" if p.isdigit() else p for p in parts)
        if key not in seen:
            seen.append(key)
    return ", ".join(seen[:12]) + (f", ... ({len(seen) - 12} more)" if len(seen) > 12 else "")


def run_export(cfg: ExportConfig) -> ExportReport:
    """Dispatch on --to / --adapter-only, print the report."""
    if cfg.to == "peft":
        from .peft import export_peft

        report = export_peft(cfg)
    else:
        from .gguf import export_adapter_gguf, export_merged_gguf

        report = export_adapter_gguf(cfg) if cfg.adapter_only else export_merged_gguf(cfg)
    for line in report.lines():
        print(line)
    return report


def export_and_answer(model: str, adapter: str | None, out: str, prompt: str, max_tokens: int = 64,
                      force: bool = True) -> str:
    """Export MODEL (+ adapter, merged; q4_1 for a 4-bit base) to ``out`` and answer ``prompt``
    through llama.cpp with the GGUF's own chat template (greedy). The demo's last step."""
    run_export(ExportConfig(model=model, out=out, adapter=adapter, force=force))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("llama.cpp is not installed: pip install llama-cpp-python") from None
    from ..model.llama_load import open_llama

    llm = open_llama(out, n_ctx=1024)
    reply = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0,
                                       max_tokens=max_tokens)
    answer = reply["choices"][0]["message"]["content"].strip()
    print(f"llama.cpp ({Path(out).name}) > {prompt}\n{answer}")
    return answer
