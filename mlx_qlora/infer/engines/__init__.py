"""Engines run a model for chat/generate/serve behind one small interface (``base.Engine``).

``load_engine`` picks one: ``mlx`` (an MLX model directory, any device), ``llama.cpp`` (a GGUF
through llama-cpp-python) or ``auto``: llama.cpp on a CPU when a GGUF of the model is at hand
(~10x faster decoding there, see docs/chat.md), MLX otherwise (Metal/CUDA, or no GGUF).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError, require
from .base import Engine, GenStats

ENGINES = ("auto", "mlx", "llama.cpp")
EMBEDDED_NAMES = ("smollm2", "embedded")


@dataclass
class EngineConfig:
    model: str | None = None          # MLX model dir, a .gguf file, or None/'smollm2' (embedded)
    adapters: list[str] = field(default_factory=list)  # NAME=DIR (or NAME=FILE.gguf) specs
    engine: str = "auto"
    gguf: str | None = None           # GGUF of the same model for the llama.cpp engine
    n_ctx: int = 4096                 # tokens, llama.cpp context size
    threads: int | None = None        # llama.cpp threads; None = all cores


def _gguf_in_dir(d: Path) -> Path | None:
    if (d / "model.gguf").is_file():
        return d / "model.gguf"
    hits = [p for p in d.glob("*.gguf") if "lora" not in p.name and "adapter" not in p.name]
    return hits[0] if len(hits) == 1 else None


def resolve(cfg: EngineConfig) -> tuple[Path | None, Path | None]:
    """(MLX model dir or None, GGUF file or None) for the model the user named."""
    model_dir = gguf = None
    if cfg.model is None or cfg.model.lower() in EMBEDDED_NAMES:
        from ...model.embedded import embedded_gguf_path

        gguf = embedded_gguf_path()
    elif cfg.model.endswith(".gguf"):
        gguf = Path(cfg.model).expanduser()
        require(gguf.is_file(), f"GGUF file {cfg.model!r} not found")
    else:
        from ...model.model_io import check_model_dir

        model_dir = check_model_dir(Path(cfg.model).expanduser())
        gguf = _gguf_in_dir(model_dir)
    if cfg.gguf:
        gguf = Path(cfg.gguf).expanduser()
        require(gguf.is_file(), f"--gguf {cfg.gguf!r}: file not found")
    return model_dir, gguf


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def choose(cfg: EngineConfig, model_dir: Path | None, gguf: Path | None) -> str:
    require(cfg.engine in ENGINES, f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}")
    if cfg.engine != "auto":
        return cfg.engine
    import mlx.core as mx

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    if gguf is not None and _llama_cpp_available() and (on_cpu or model_dir is None):
        return "llama.cpp"
    return "mlx"


def load_engine(cfg: EngineConfig) -> Engine:
    from ..adapters import parse_adapter_specs

    specs = parse_adapter_specs(cfg.adapters)
    model_dir, gguf = resolve(cfg)
    kind = choose(cfg, model_dir, gguf)
    if kind == "mlx":
        if model_dir is None:
            raise UserError(f"the MLX engine needs an MLX model directory, not {gguf}; make one with "
                            f"`mlx_qlora convert {gguf if cfg.model else ''} -o DIR`".replace("  ", " ")
                            + " or use --engine llama.cpp")
        from .mlx_engine import MLXEngine

        return MLXEngine(model_dir, specs)
    if gguf is None:
        raise UserError(f"the llama.cpp engine needs a GGUF of {model_dir}: pass --gguf FILE or put "
                        f"model.gguf in the model directory (mlx_qlora export writes one)")
    from .llamacpp import LlamaCppEngine

    name = model_dir.name if model_dir is not None else None
    return LlamaCppEngine(gguf, specs, n_ctx=cfg.n_ctx, n_threads=cfg.threads, model_name=name)


__all__ = ["Engine", "EngineConfig", "GenStats", "load_engine", "ENGINES"]
