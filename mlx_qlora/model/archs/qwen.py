"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head RMSNorm on q and k, explicit head_dim).

Both use NEOX (half-split) rope in llama.cpp, the Hugging Face order: no Q/K permutation.
"""
from __future__ import annotations

from . import Arch
from .llama import export_check, from_gguf, write_meta

QWEN2 = Arch("qwen2", ("qwen2",), "qwen2", export_check=export_check, write_meta=write_meta, from_gguf=from_gguf)
QWEN3 = Arch("qwen3", ("qwen3",), "qwen3", required=("head_dim",), export_check=export_check,
             write_meta=write_meta, from_gguf=from_gguf)
ARCHS = [QWEN2, QWEN3]
