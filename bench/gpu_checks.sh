#!/usr/bin/env bash
# The GPU checks of issue 12 on a lent NVIDIA machine with no package registry, in two calls
# (MLX's CUDA wheel is carried in two parts: see ../shared/tools/pack-mlx-cuda.sh):
#   bash bench/gpu_checks.sh 1 OUT   # wheels into /tmp/site, part 1 kept in /tmp, torch+PEFT rows
#   bash bench/gpu_checks.sh 2 OUT   # MLX CUDA unpacked, mlx_qlora/mlx-lm rows, the suite
# Expects (ignored, carried): .whl/ (optuna, llguidance, openai, jsonschema... for Python 3.12),
# .gpu/wheels + .gpu/unpack.sh + .gpu/part1/ (call 1), .gpu/part2/ (call 2), .gpu/data/wikisql.
# Outputs under OUT: torch.json, mlx.json, bench*.log, pytest.log, env.txt.
set -uo pipefail
stage="$1"; out="$2"; cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "$stage" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/env.txt" 2>&1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .gpu/wheels/*.whl || exit 1
  cp .gpu/part1/* /tmp/mlxcuda.part1
  python3 -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__,
'transformers', transformers.__version__)" >> "$out/env.txt" 2>&1
  # torch+PEFT reference rows (need no MLX): the same shapes, batch and steps as call 2's rows
  timeout 300 python3 bench/train_gpu.py --shape 1b,8b --systems torch --json "$out/torch.json" \
    2>&1 | tee "$out/bench_torch.log"
  exit 0
fi
# ---- call 2
source .gpu/unpack.sh /tmp/mlxcuda.part1 .gpu/part2/mlxcuda.part2
export PYTHONPATH=/tmp/site:$PWD
mkdir -p ../shared/data && cp -r .gpu/data/wikisql ../shared/data/ 2>/dev/null
python3 -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, mx.default_device(), 'mlx_lm',
mlx_lm.__version__)" | tee -a "$out/env.txt" || exit 1
# mlx_qlora = base_matmul auto (dequantize + GEMM on CUDA) beside mlx_qlora_qmm (the quantized kernels);
# 2 warm-up + 5 timed steps so the 8B mlx-lm row fits (the first MLX row also pays the CUDA JIT)
timeout 300 python3 bench/train_gpu.py --shape 1b,8b --systems mlx_qlora,mlx_qlora_qmm,mlx_lm --warmup 2 \
  --steps 5 --json "$out/mlx.json" 2>&1 | tee "$out/bench_mlx.log"
timeout "${SUITE_S:-230}" python3 -m pytest -m "not real and not llamacpp" -q -p no:cacheprovider -p no:benchmark \
  -n 15 --timeout 150 -rfE --tb=line -o console_output_style=classic 2>&1 | tee "$out/pytest.log" | tail -80
