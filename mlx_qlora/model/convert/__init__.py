"""``mlx_qlora convert``: HF hub id / local HF directory / GGUF file -> MLX model directory."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError, require
from ..quant import ALLOWED_BITS, ALLOWED_GROUP_SIZES

DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ConvertConfig:
    source: str | None          # hub id, local HF dir, .gguf path; None/"smollm2" = embedded model
    out_dir: str
    q_bits: int = 4             # bits per quantized weight
    q_group_size: int = 64      # weights per (scale, bias) pair
    quantize: bool = True       # False keeps float weights in `dtype`
    dtype: str | None = None    # float tensors (norms, scales, biases); None: float32 on CPU else float16
    requantize: bool = False    # GGUF: re-quantize even blocks that map exactly
    force: bool = False         # replace out_dir if it exists

    def __post_init__(self):
        require(self.q_bits in ALLOWED_BITS,
                f"--q-bits {self.q_bits} is not supported; use one of {', '.join(map(str, ALLOWED_BITS))}")
        require(self.q_group_size in ALLOWED_GROUP_SIZES,
                f"--q-group-size {self.q_group_size} is not supported; use one of "
                f"{', '.join(map(str, ALLOWED_GROUP_SIZES))}")
        require(self.dtype is None or self.dtype in DTYPES,
                f"--dtype {self.dtype} is not supported; use one of {', '.join(DTYPES)}")
        require(bool(self.out_dir), "an output directory is required: pass -o DIR")

    def resolved_dtype(self):
        import mlx.core as mx

        if self.dtype is None:  # CPU matmuls are fast only in fp32; GPUs like half precision
            return mx.float32 if mx.default_device() == mx.cpu else mx.float16
        return getattr(mx, self.dtype)


@dataclass
class ConvertReport:
    """What a conversion did; printed at the end and returned to API callers."""

    source: str
    out_dir: str
    model_type: str
    exact: list[str] = field(default_factory=list)        # quantized blocks copied as they were
    requantized: list[str] = field(default_factory=list)  # quantized (or re-quantized) here
    floats: list[str] = field(default_factory=list)       # kept as float tensors
    bits_per_weight: float = 0.0
    size_bytes: int = 0
    rel_rms_error: float = 0.0                             # ||W_hat - W|| / ||W|| over requantized

    def lines(self) -> list[str]:
        return [
            f"converted {self.source} ({self.model_type}) -> {self.out_dir}",
            f"  tensors: {len(self.exact)} quantized blocks kept exactly, {len(self.requantized)} quantized here, "
            f"{len(self.floats)} float",
            f"  bits per weight: {self.bits_per_weight:.3f}   size on disk: {self.size_bytes / 2**20:.1f} MiB",
            f"  quantization round-trip error (relative RMS, tensors quantized here): {self.rel_rms_error:.4%}",
        ]


def run_convert(cfg: ConvertConfig) -> ConvertReport:
    """Dispatch on the source kind, write the model directory atomically, print the report."""
    from ..embedded import embedded_gguf_path

    src = cfg.source
    if src is None or src.lower() in ("smollm2", "embedded", "default"):
        src = str(embedded_gguf_path())
    path = Path(src).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and _is_gguf(path)):
        require(path.exists(), f"GGUF file {path} does not exist; check the path")
        from .gguf import convert_gguf

        report = convert_gguf(path, cfg)
    elif path.exists():
        from .hf import convert_hf_dir

        report = convert_hf_dir(path, cfg)
    elif _looks_like_hub_id(src):
        from .hf import convert_hub_id

        report = convert_hub_id(src, cfg)
    else:
        raise UserError(f"source {src} is neither an existing path nor a Hugging Face hub id (owner/name); check it")
    for line in report.lines():
        print(line)
    return report


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
