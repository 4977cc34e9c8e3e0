#!/usr/bin/env bash
# The test suite (CPU; GPU tests are skipped without CUDA), in parallel processes (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
# the tests in as many processes as cores, up to 4 (most of their time is single-threaded: imports, subprocesses)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 "$@"
