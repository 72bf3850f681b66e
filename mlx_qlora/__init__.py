"""mlx_qlora: QLoRA fine-tuning on MLX with export to llama.cpp.

Importing the package binds a real CBLAS first (see ``_blas``), so import ``mlx_qlora`` before
``mlx.core`` anywhere speed on CPU matters. Nothing heavy is imported here.
"""
from . import _blas

_blas.load()

__version__ = "0.1.0"
