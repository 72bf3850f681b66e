"""OLMo 2: norms after attention and after the MLP (no pre-norms), RMSNorm on the whole q and k
projections (not per head). NEOX rope in llama.cpp: no Q/K permutation."""
from __future__ import annotations

from . import Arch
from .llama import export_check, from_gguf, write_meta

ARCHS = [Arch("olmo2", ("olmo2",), "olmo2", export_check=export_check, write_meta=write_meta, from_gguf=from_gguf)]
