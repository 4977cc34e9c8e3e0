#!/usr/bin/env bash
# The test suite (CPU; GPU tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
