#!/usr/bin/env bash
# The GPU checks in one device call (run from the repository root on the GPU machine; see benchmarks/RESULTS.md).
# Needs: .whl (../shared/gpu/fetch-wheels.sh, plus gguf) installed into /tmp/site, the SmolLM2 GGUF as
# .gpu/smollm2.gguf.part-* (too big to carry in one call), and .gpu/Qwen3-30B-A3B.json. A carried folder is gone
# in the next call that does not carry it: carry .gpu (first part) in one call and copy it to /tmp there, then the
# other parts under .gpu2 in the next, within the machine's idle time, and join them into .gpu (RESULTS.md session 22).
set -euo pipefail
if [ ! -d /tmp/site/megatron ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
[ -f /tmp/smollm2.gguf ] || cat .gpu/smollm2.gguf.part-* > /tmp/smollm2.gguf
export HF2MCORE_SMOLLM2_GGUF=/tmp/smollm2.gguf HF2MCORE_CACHE=/tmp/hf2mcore-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_quant.py --out "${OUT:-/tmp/gpu_out}" --moe-config .gpu/Qwen3-30B-A3B.json "$@"
