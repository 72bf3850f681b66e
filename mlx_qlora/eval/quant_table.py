"""``mlx_qlora eval MODEL --quant-sweep``: perplexity, size and speed across quantizations.

Every row scores the same token ids (the rows of ``--data`` encoded once by MODEL's tokenizer,
training's masks) with the same summed cross-entropy:

- ``source``: MODEL as it is on disk (for a converted GGUF, its blocks copied exactly);
- ``MLX 16-bit``: every quantized weight dequantized to float16; the reference for MLX rows;
- ``MLX N-bit``: the 16-bit weights re-quantized with MLX affine quantization (``--bits``,
  ``--group-size``), every Linear/Embedding whose width divides the group size;
- ``GGUF T``: ``mlx_qlora export --type T`` of MODEL, scored by llama.cpp; the reference for
  GGUF rows is F16. Export keeps a tensor that is exact in a finer block type (a Q4_1 model asked
  for Q4_0 stays Q4_1); the row then says ``(kept Q4_1)``.

A 16-bit row is only as precise as MODEL: a model converted from a 4-bit GGUF gives back its
4-bit values in float16, so its "16-bit" is the dequantized 4-bit model, not the original
float weights. Sizes are the weight files on disk; bits/weight counts scales and biases (MLX) or
block headers (GGUF) over the model's parameters. tok/s is scoring speed (tokens through the
model per second); on CPU the MLX rows run the NumPy engine, which dequantizes to fp32 once, so
their speed hardly depends on the bit width.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, atomic_file
from ..errors import require
from .loss import LlamaCppScorer, LossResult, MLXScorer, load_examples, score


@dataclass
class Row:
    fmt: str              # "MLX 8-bit g64", "GGUF q8_0", ...
    engine: str
    bits_per_weight: float
    size_bytes: int
    result: LossResult
    ref: str | None = None   # the row this one is compared with

    def cells(self, rows: dict) -> list[str]:
        base = rows.get(self.ref)
        delta = f"{100 * (self.result.perplexity / base.result.perplexity - 1):+.2f}%" if base else "—"
        return [self.fmt, self.engine, f"{self.bits_per_weight:.2f}", f"{self.size_bytes / 2**20:.1f}",
                f"{self.result.perplexity:.4f}", delta, f"{self.result.tokens_per_s:,.0f}"]


HEADER = ["format", "scored by", "bits/weight", "size MiB", "perplexity", "vs 16-bit", "tok/s"]


def _weights_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def mlx_bits_per_weight(model_dir: Path) -> float:
    from ..export.fuse import read_weights
    from ..model.quant import bits_per_weight

    config = json.loads((model_dir / "config.json").read_text())
    q = config.get("quantization") or {}
    weights = read_weights(model_dir)
    bits_of = {k[: -len(".scales")]: int((q.get(k[: -len(".scales")]) or {}).get("bits", q.get("bits", 16)))
               for k in weights if k.endswith(".scales")}
    return bits_per_weight(weights, bits_of)


def dequantized(weights: dict, config: dict) -> dict:
    """Every quantized module of ``weights`` as float16 (its exact dequantized values)."""
    import mlx.core as mx

    q = config.get("quantization") or {}
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        m = key[: -len(".scales")]
        own = q.get(m) if isinstance(q.get(m), dict) else {}
        bits, gs = int(own.get("bits", q.get("bits", 4))), int(own.get("group_size", q.get("group_size", 64)))
        out[f"{m}.weight"] = mx.dequantize(out.pop(f"{m}.weight"), out.pop(f"{m}.scales"), out.pop(f"{m}.biases"),
                                           group_size=gs, bits=bits).astype(mx.float16)
    return {k: (v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in out.items()}


def write_mlx_variant(src: Path, dst: Path, bits: int, group_size: int, force: bool) -> Path:
    """``src`` at ``bits`` (16: float16) as a model directory ``dst``."""
    import mlx.core as mx

    from ..export.fuse import read_weights
    from ..model.model_io import write_model_dir
    from ..model.quant import quantize

    config = json.loads((src / "config.json").read_text())
    weights = dequantized(read_weights(src), config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if bits != 16:
        for k in [k for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2]:
            if weights[k].shape[-1] % group_size == 0:
                m = k[: -len(".weight")]
                weights[k], weights[f"{m}.scales"], weights[f"{m}.biases"] = quantize(weights[k], bits, group_size)
        config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": bits}
    mx.eval(weights)
    with atomic_dir(dst, force=force) as tmp:
        write_model_dir(tmp, weights, config)
        for f in src.iterdir():   # tokenizer files and chat template
            if f.is_file() and f.suffix not in (".safetensors", ".gguf") and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
    return dst


def gguf_facts(path: Path) -> tuple[float, str]:
    """(bits per weight over all tensors, the block type holding most of the weights)."""
    from collections import Counter

    import gguf

    r = gguf.GGUFReader(str(path))
    by_type: Counter = Counter()
    for t in r.tensors:
        by_type[t.tensor_type.name] += int(t.n_elements)
    bits = 8 * sum(int(t.n_bytes) for t in r.tensors) / max(sum(int(t.n_elements) for t in r.tensors), 1)
    return bits, by_type.most_common(1)[0][0] if by_type else "?"


def _gguf_label(requested: str, written: str) -> str:
    """'GGUF Q4_0', or 'GGUF Q4_0 (kept Q4_1)' when export kept exact blocks of a finer type."""
    return f"GGUF {requested.upper()}" + (f" (kept {written})" if written != requested.upper() else "")


def _mlx_label(model_dir: Path) -> str:
    q = json.loads((model_dir / "config.json").read_text()).get("quantization")
    if not q:
        return "MLX float"
    mixed = sorted({v["bits"] for v in q.values() if isinstance(v, dict) and "bits" in v} - {q["bits"]})
    return f"MLX {q['bits']}-bit g{q['group_size']}" + (f", some {'/'.join(map(str, mixed))}-bit" if mixed else "")


def quant_sweep(cfg, say=print) -> dict:
    """Score MODEL across ``cfg.bits`` (MLX) and ``cfg.gguf_types`` (llama.cpp); write the table
    (Markdown + JSON) and the size-vs-perplexity PNG into ``cfg.out``."""
    from ..export import ExportConfig
    from ..export.gguf import export_merged_gguf

    src = Path(cfg.model)
    out = Path(cfg.out or f"{src.name}-quant-sweep")
    table = out / "quant_table.md"
    require(cfg.force or not table.exists(), f"{table} already exists; pass --force to redo the sweep or "
                                             "choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Row] = {}
    scorer = MLXScorer(src)
    examples = load_examples(cfg.data_cfg, scorer.tokenizer, cfg.max_rows, say)
    n_ctx = max(64, max(len(e.tokens) for e in examples) + 1)
    plan = [("source", None)] + [("mlx", b) for b in cfg.bits] + [("gguf", t) for t in cfg.gguf_types]
    say(f"quant sweep of {src}: {len(plan)} variants on {len(examples)} rows -> {out}")

    def add(name, row):
        rows[name] = row
        r = row.result
        say(f"  [{len(rows)}/{len(plan)}] {row.fmt:22s} ppl {r.perplexity:9.4f}  {row.bits_per_weight:5.2f} bits/w  "
            f"{row.size_bytes / 2**20:7.1f} MiB  {r.tokens_per_s:7,.0f} tok/s ({row.engine})")

    for kind, v in plan:
        if kind == "source":
            res = score(examples, scorer, cfg.batch_size, scorer.engine)
            add("source", Row(f"source ({_mlx_label(src)})", "MLX", mlx_bits_per_weight(src), _weights_size(src),
                              res, "mlx16"))
            del scorer
        elif kind == "mlx":
            d = write_mlx_variant(src, out / ("mlx-f16" if v == 16 else f"mlx-{v}bit-g{cfg.group_size}"), v,
                                  cfg.group_size, force=True)
            s = MLXScorer(d)
            label = "MLX 16-bit (float16)" if v == 16 else f"MLX {v}-bit g{cfg.group_size}"
            add(f"mlx{v}", Row(label, "MLX", mlx_bits_per_weight(d), _weights_size(d),
                               score(examples, s, cfg.batch_size, s.engine), "mlx16"))
            del s
        else:
            f = out / f"model.{v}.gguf"
            export_merged_gguf(ExportConfig(model=str(src), out=str(f), type=v, modelfile=False, force=True))
            s = LlamaCppScorer(f, n_ctx=n_ctx)
            bits, written = gguf_facts(f)
            add(f"gguf-{v}", Row(_gguf_label(v, written), "llama.cpp", bits, f.stat().st_size,
                                 score(examples, s, cfg.batch_size, s.engine), "gguf-f16"))
            s.close()
    notes = comparisons(rows)
    md = markdown(rows, src, cfg, examples, notes)
    with atomic_file(table, force=True) as tmp:
        tmp.write_text(md)
    png = plot(rows, out / "quant_table.png", src.name)
    result = {"model": str(src), "data": str(cfg.data_cfg.train), "rows": {k: {
        **r.result.as_dict(), "format": r.fmt, "scored_by": r.engine, "bits_per_weight": r.bits_per_weight,
        "size_bytes": r.size_bytes, "ref": r.ref} for k, r in rows.items()}, "notes": notes}
    with atomic_file(out / "quant_table.json", force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    say("")
    say(md)
    say(f"table: {table}   plot: {png}")
    return result


def comparisons(rows: dict) -> list[str]:
    """The checks a reader wants, as sentences: 8-bit vs 16-bit, Q8_0 vs F16, MLX vs GGUF."""
    def pct(a, b):
        return 100 * (rows[a].result.perplexity / rows[b].result.perplexity - 1)

    out = []
    for a, b, what in (("mlx8", "mlx16", "MLX 8-bit vs MLX 16-bit"), ("gguf-q8_0", "gguf-f16", "GGUF Q8_0 vs GGUF F16"),
                       ("gguf-f16", "mlx16", "GGUF F16 (llama.cpp) vs MLX 16-bit (same weights)"),
                       ("gguf-q4_1", "source", "GGUF Q4_1 (llama.cpp) vs the source MLX model")):
        if a in rows and b in rows:
            out.append(f"{what}: {pct(a, b):+.3f}% perplexity")
    return out


def command(cfg) -> str:
    """The command line that makes this table."""
    parts = [f"mlx_qlora eval {cfg.model} --quant-sweep --data {cfg.data}"]
    if cfg.split != "test":
        parts.append(f"--split {cfg.split}")
    if cfg.max_rows:
        parts.append(f"--max-rows {cfg.max_rows}")
    parts.append(f"--bits {','.join(map(str, cfg.bits)) or 'none'} --group-size {cfg.group_size}")
    parts.append(f"--gguf-types {','.join(cfg.gguf_types) or 'none'}")
    return " ".join(parts)


def markdown(rows: dict, src: Path, cfg, examples: list, notes: list[str]) -> str:
    n_tok = sum(int(e.mask[1:].sum()) for e in examples)
    lines = [f"Quantization sweep of `{src.name}` on `{cfg.data_cfg.train}` ({len(examples)} rows, "
             f"{n_tok:,} loss tokens; `{command(cfg)}`).",
             "", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r.cells(rows)) + " |" for r in rows.values()]
    lines += ["", "'vs 16-bit': MLX rows against MLX 16-bit, GGUF rows against GGUF F16."]
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def plot(rows: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, marker in (("MLX", "o"), ("llama.cpp", "s")):
        pts = [r for r in rows.values() if r.engine == engine]
        if pts:
            ax.scatter([r.size_bytes / 2**20 for r in pts], [r.result.perplexity for r in pts], marker=marker,
                       label=engine)
            for r in pts:
                ax.annotate(r.fmt.replace("MLX ", "").replace("GGUF ", ""), (r.size_bytes / 2**20, r.result.perplexity),
                            textcoords="offset points", xytext=(4, 4 if engine == "MLX" else -11), fontsize=7)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity")
    ppl = [r.result.perplexity for r in rows.values()]
    if max(ppl) / min(ppl) > 20:          # 2-bit rows can be orders of magnitude off
        ax.set_yscale("log")
    ax.set_title(f"{title}: size vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
