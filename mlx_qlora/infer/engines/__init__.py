"""Engines run a model for chat/generate/serve behind one small interface (``base.Engine``).

``load_engine`` picks one: ``mlx`` (an MLX model directory, any device), ``llama.cpp`` (a GGUF
through llama-cpp-python) or ``auto``: llama.cpp on a CPU (~10x faster decoding there, see
docs/chat.md) whenever a GGUF holding the model's weights is at hand or can be made losslessly
(``gguf_cache``: the GGUF ``convert`` recorded, one in the directory, or one built once and
cached there, said in one line), MLX otherwise (Metal/CUDA, or no exact GGUF: one line says why
and how to get one).
"""
from __future__ import annotations

import sys
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
        from .gguf_cache import find_gguf

        model_dir = check_model_dir(Path(cfg.model).expanduser())
        gguf = find_gguf(model_dir)[0]
    if cfg.gguf:
        gguf = Path(cfg.gguf).expanduser()
        require(gguf.is_file(), f"--gguf {cfg.gguf!r}: file not found")
    return model_dir, gguf


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu


def choose(cfg: EngineConfig, model_dir: Path | None, gguf: Path | None) -> str:
    require(cfg.engine in ENGINES, f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}")
    if cfg.engine != "auto":
        return cfg.engine
    if gguf is not None and _llama_cpp_available() and (model_dir is None or _on_cpu()):
        return "llama.cpp"
    return "mlx"


def _gguf_on_first_use(cfg: EngineConfig, model_dir: Path) -> tuple[Path | None, str | None]:
    """No GGUF at hand for ``model_dir``: build one where llama.cpp would run (auto on a CPU, or
    asked for) and the weights allow it exactly. ``(GGUF or None, a line saying why the slow
    MLX engine runs, or None)``; the caller shows that line once its own start-up has succeeded."""
    from .gguf_cache import EXPORT_HINT, build_gguf

    if cfg.engine == "auto":
        if not _on_cpu():
            return None, None
        if not _llama_cpp_available():
            return None, ("engine: mlx, slow on a CPU: llama-cpp-python is not installed; `pip install "
                          "llama-cpp-python` gives ~10x faster decoding")
    gguf, why = build_gguf(model_dir, say=lambda line: print(line, file=sys.stderr, flush=True))
    if gguf is not None:
        return gguf, None
    if cfg.engine == "llama.cpp":
        raise UserError(f"the llama.cpp engine needs a GGUF of {model_dir}, and none can be made exactly "
                        f"({why}): pass --gguf FILE or run `{EXPORT_HINT.format(d=model_dir)}`")
    return None, (f"engine: mlx, slow on a CPU: no exact GGUF of {model_dir} ({why}); for ~10x faster "
                  f"decoding run `{EXPORT_HINT.format(d=model_dir)}` (rounds what GGUF cannot hold) or "
                  f"pass --gguf FILE")


def load_engine(cfg: EngineConfig) -> Engine:
    from ..adapters import parse_adapter_specs

    specs = parse_adapter_specs(cfg.adapters)
    model_dir, gguf = resolve(cfg)
    note = None
    if gguf is None and model_dir is not None and cfg.engine != "mlx":
        gguf, note = _gguf_on_first_use(cfg, model_dir)
    kind = choose(cfg, model_dir, gguf)
    if kind == "mlx":
        if model_dir is None:
            raise UserError(f"the MLX engine needs an MLX model directory, not {gguf}; make one with "
                            f"`mlx_qlora convert {gguf if cfg.model else ''} -o DIR`".replace("  ", " ")
                            + " or use --engine llama.cpp")
        from .mlx_engine import MLXEngine

        engine = MLXEngine(model_dir, specs)
        engine.note = note
        return engine
    if gguf is None:
        raise UserError(f"the llama.cpp engine needs a GGUF of {model_dir}: pass --gguf FILE or put "
                        f"model.gguf in the model directory (mlx_qlora export writes one)")
    from .llamacpp import LlamaCppEngine

    name = model_dir.name if model_dir is not None else None
    return LlamaCppEngine(gguf, specs, n_ctx=cfg.n_ctx, n_threads=cfg.threads, model_name=name)


__all__ = ["Engine", "EngineConfig", "GenStats", "load_engine", "ENGINES"]
