#!/usr/bin/env bash
# The hybrid-model GPU checks in one device call (run from the repository root on the GPU machine).
# Needs (ignored paths, carried): .whl (../shared/gpu/fetch-wheels.sh, plus mamba-ssm built without its CUDA
# extension, einops and fla: MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-build-isolation
# --no-deps mamba-ssm einops flash-linear-attention fla-core -w .whl), .gpu/megatron-lm (a copy of
# ../shared/megatron-lm) and .gpu/hf_configs (the Nemotron-H and Qwen3-Next configs of ../shared/hf_configs).
set -euo pipefail
if [ ! -d /tmp/site/megatron ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD HF2MCORE_HF_CONFIGS=$PWD/.gpu/hf_configs HF2MCORE_CACHE=/tmp/hf2mcore-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_hybrid.py --megatron-lm .gpu/megatron-lm "$@"
TRITON_F32_DEFAULT=ieee python3 benchmarks/gpu_hybrid.py --megatron-lm .gpu/megatron-lm --work /tmp/gpu_hybrid_ieee "$@"
