#!/usr/bin/env bash
# The main job: convert the embedded SmolLM2-135M-Instruct to a Megatron-LM torch_dist checkpoint and verify it.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec .venv/bin/hf2mcore convert "" out/SmolLM2-135M-Instruct --overwrite --verify "$@"
