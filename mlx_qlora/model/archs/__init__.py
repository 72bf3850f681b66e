"""Architecture families: one table that convert, export and the tests ask, never a family name.

Modelling is mlx-lm's (``mlx_lm.models.<model_type>``); GGUF tensor names are gguf-py's
(``gguf.get_tensor_name_map``, which knows each llama.cpp architecture's tensors). What is left
is what differs between families on the way to and from llama.cpp, one :class:`Arch` per family
in its own module (llama.py, qwen.py, gemma.py, phi3.py, smollm3.py, olmo2.py, granite.py):

- ``permute_qk``: llama.cpp's "normal" (interleaved-pair) rope families store Q/K rows permuted;
  its NEOX-rope families (qwen, gemma, phi3, olmo2) store them in Hugging Face order;
- ``norm_offset``: Gemma computes ``x * (1 + w)``; llama.cpp stores ``1 + w``;
- ``normalize``: transformers-5 config keys hoisted to where mlx-lm reads them;
- ``check``: config features mlx-lm does not model (refused at convert, one line);
- ``export_check``: features llama.cpp would run differently (refused at export, one line);
- ``write_meta`` / ``extra_tensors`` / ``from_gguf``: GGUF metadata and generated tensors
  (rope frequency factors) both ways.

A new family is one module with one ``Arch`` registered here, and one row in the tests' table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ...errors import UserError, require


def _none(*_a, **_k):
    return None


@dataclass(frozen=True)
class Arch:
    family: str                          # the support matrix's label
    model_types: tuple[str, ...]         # HF / mlx-lm config model_type values
    gguf_arch: str                       # GGUF general.architecture
    permute_qk: bool = False             # Q/K rows in llama.cpp's interleaved-rope order
    norm_offset: float = 0.0             # GGUF norm weight = MLX norm weight + this
    required: tuple[str, ...] = ()       # config keys this family needs beyond the common ones
    normalize: Callable[[dict], dict] = lambda c: c
    check: Callable[[dict], None] = _none
    export_check: Callable[[dict], "str | None"] = _none
    write_meta: Callable = _none         # (gguf writer, config) -> None
    extra_tensors: Callable[[dict], dict] = lambda c: {}   # config -> {gguf name: float32 array}
    from_gguf: Callable = _none          # (metadata, arch, config) -> None: fills config in place
    gguf_extra: tuple[str, ...] = ()     # GGUF tensors that are not weights (generated on export)
    rope_dims: Callable[[dict], int] | None = None   # rotary dims when not the whole head

    def head_dim(self, config: dict) -> int:
        return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])

    def rotary_dims(self, config: dict) -> int:
        return int(self.rope_dims(config)) if self.rope_dims else self.head_dim(config)


def _registry() -> list[Arch]:
    from . import gemma, granite, llama, olmo2, phi3, qwen, smollm3

    return [*llama.ARCHS, *qwen.ARCHS, *gemma.ARCHS, *phi3.ARCHS, *smollm3.ARCHS, *olmo2.ARCHS, *granite.ARCHS]


@lru_cache(maxsize=None)
def _by_model_type() -> dict[str, Arch]:
    return {t: a for a in _registry() for t in a.model_types}


@lru_cache(maxsize=None)
def _by_gguf_arch() -> dict[str, Arch]:
    out: dict[str, Arch] = {}
    for a in _registry():
        out.setdefault(a.gguf_arch, a)   # llama: the llama family (mistral writes llama too)
    return out


def model_types() -> list[str]:
    return list(_by_model_type())


def gguf_archs() -> list[str]:
    return list(_by_gguf_arch())


def for_model_type(mtype, context: str = "") -> Arch:
    """The family of an HF / mlx-lm ``model_type``, or one UserError line naming the supported
    (``context`` prefixes it, e.g. "cannot export to GGUF: ")."""
    arch = _by_model_type().get(mtype)
    if arch is None:
        raise UserError(f"{context}architecture (model_type) {mtype!r} is not supported; "
                        f"supported: {', '.join(model_types())}")
    return arch


def for_gguf_arch(name) -> Arch:
    arch = _by_gguf_arch().get(name)
    if arch is None:
        raise UserError(f"GGUF architecture {name!r} is not supported; supported: {', '.join(gguf_archs())}")
    return arch


def normalize(config: dict) -> dict:
    """``config`` with its family's keys where mlx-lm reads them (unknown families unchanged)."""
    arch = _by_model_type().get(config.get("model_type"))
    return arch.normalize(dict(config)) if arch else config


def check_config(config: dict, where: str) -> Arch:
    """The family of ``config`` after checking the keys it needs; each problem one line."""
    arch = for_model_type(config.get("model_type"))
    for key in arch.required:
        require(config.get(key) is not None, f"{where} lacks '{key}', which {arch.family} models need; "
                                             "fix or re-download config.json")
    arch.check(config)
    return arch


# ---------------------------------------------------------------- tensor names (gguf-py's tables)
MLX_SUFFIXES = ("weight", "bias", "scales", "biases")


_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


@lru_cache(maxsize=None)
def _name_map(gguf_arch: str):
    import gguf

    ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(ids[gguf_arch], 1)   # block 0 stands for every block


@lru_cache(maxsize=65536)
def gguf_name(arch: Arch, mlx_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.scales' -> 'blk.3.attn_q.scales' (None if gguf-py has
    no such tensor for this architecture). MLX's quantization suffixes carry over unchanged."""
    module, _, suffix = mlx_name.rpartition(".")
    if suffix not in MLX_SUFFIXES:
        return None
    hit = _BLOCK.match(module)
    base = _name_map(arch.gguf_arch).get_name(_BLOCK.sub("model.layers.0.", module) if hit else module)
    if not base:
        return None
    if hit:
        base = base.replace("blk.0.", f"blk.{hit.group(1)}.", 1)
    return f"{base}.{suffix}"


def mlx_modules(config: dict) -> list[str]:
    """The parameter names of the mlx-lm model ``config`` describes (arrays are not evaluated:
    MLX is lazy, so even a 7B skeleton costs nothing)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return [k for k, _ in tree_flatten(model_class(args_class.from_dict(config)).parameters())]


def gguf_to_mlx_modules(arch: Arch, config: dict) -> dict[str, str]:
    """{GGUF tensor base name: MLX module path} for the model ``config`` describes."""
    out = {}
    for name in mlx_modules(config):
        g = gguf_name(arch, name)
        if g is not None:
            out[g.rsplit(".", 1)[0]] = name.rsplit(".", 1)[0]
    return out
