"""The training engines of stage ``train`` (imported by ``loop``, ``lora`` and ``memory_plan``).

``numpy_engine`` (the padding-free NumPy + BLAS forward/backward on CPU) built from
``numpy_kernels``, ``cpu_proj`` (a projection and its LoRA branch), ``cpu_gemm`` and ``bf16_head``
(bf16 GEMMs through oneMKL) and ``cpu_fused`` (C kernels for the bf16 path's elementwise work); ``mlx_cpu_kernels`` (dequantize + BLAS and chunked loss inside MLX autodiff, used
when the NumPy engine does not cover a model); ``mlx_step`` (the compiled Metal/CUDA step) with
``dequant_gemm`` (4-bit products as dequantize + GEMM on CUDA).

May import: the rest of ``mlx_qlora.train`` (``lora``), ``mlx_qlora.model`` and the leaves.
"""
