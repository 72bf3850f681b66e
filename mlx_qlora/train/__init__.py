"""Stage ``train``: QLoRA fine-tuning.

``loop`` (the training loop: steps, evaluation, checkpoints, resume), ``config`` (the typed recipe
dataclasses), ``data`` (JSONL formats, loss masks, batching), ``lora`` (LoRA/DoRA layers and the
adapter files training writes), ``adapter_files`` (the one reader of an adapter directory, used by
every later stage), ``report`` (progress bar, summary, loss-curve PNG) and ``engines/``: the two CPU
paths (``numpy_engine``, the padding-free NumPy + BLAS forward/backward built from
``numpy_kernels``; ``mlx_cpu_kernels``, dequantize + BLAS and chunked loss inside MLX autodiff, used
when the NumPy engine does not cover a model) and the GPU step (``mlx_step``, ``dequant_gemm``). ``distributed`` makes the loop data-parallel over
``mx.distributed`` under ``mlx.launch``; ``launch`` is ``train --nproc N`` (local ranks). ``preference`` (DPO / ORPO losses,
the reference pass, reward metrics), ``preference_data`` (pairs) and ``preference_config``
(the ``preference:`` section) make ``method: dpo | orpo``.

May import: ``mlx_qlora.model`` and the leaves. Never ``export``, ``infer``, ``eval`` or ``apps``.
``train``, ``load_config`` and ``TrainConfig`` are re-exported, lazily (importing this package
loads no MLX).
"""
_LAZY = {"train": ".loop", "load_config": ".config", "TrainConfig": ".config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
