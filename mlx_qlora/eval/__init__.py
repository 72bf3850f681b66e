"""Stage ``eval``: how good is this model now?

``config`` (``EvalConfig``: the command's settings, a recipe's ``task:`` block, the data file),
``loss`` (mean token loss and perplexity with the training masks and the training loss function:
the NumPy engine's forward on CPU, MLX elsewhere, llama.cpp for a GGUF on the same tokens),
``tasks`` (generation metrics: exact match, JSON fields, the worst examples), ``json_fields``
(JSON validity and per-field scoring), ``quant_table`` (perplexity, size and speed across MLX
bit widths and GGUF types, as Markdown and a PNG) and ``run`` (``run_eval``, what the CLI calls).

May import: ``infer`` (engines for generation), ``export`` (GGUF files to score), ``train``
(data, loss, adapters), ``model`` and the leaves. Never ``apps`` or the CLI.
``run_eval`` and ``EvalConfig`` are re-exported lazily (importing this package loads no MLX).
"""
_LAZY = {"run_eval": ".run", "EvalConfig": ".config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
