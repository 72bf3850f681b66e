"""Stage ``infer``: running a base model with its adapters.

``generate`` (sampling, KV-cache reuse, detokenizers), ``adapters`` (several LoRA adapters over
one base, switched without reloading), ``engines`` (one interface over MLX and llama.cpp, picked
by ``load_engine``), ``chat`` (the REPL and one-shot ``generate``) and ``serve`` (the
OpenAI-compatible server).

May import: ``export`` (its LoRA GGUF writer, for llama.cpp adapters), ``train`` (the adapter
reader and LoRA shapes), ``model`` and the leaves. Never ``eval`` or ``apps``.
``load_engine``, ``EngineConfig`` and ``SamplingConfig`` are re-exported lazily.
"""
_LAZY = {"load_engine": ".engines", "EngineConfig": ".engines", "SamplingConfig": ".generate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
