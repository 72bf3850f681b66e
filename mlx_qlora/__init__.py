"""mlx_qlora: QLoRA fine-tuning on MLX with export to llama.cpp.

Importing the package binds a real CBLAS first (see ``model.blas``), so import ``mlx_qlora`` before
``mlx.core`` anywhere speed on CPU matters. Nothing heavy is imported here.
"""
import os

from .model import blas

# transformers prints an advisory on import when torch is absent; we never need torch models.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

blas.load()

__version__ = "0.1.0"
