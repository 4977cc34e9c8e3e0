#!/usr/bin/env bash
# The converters users would pick instead of hf2mcore, each in a virtual environment of its own under .peers/, for
# benchmarks/run.py. Each environment sees hf2mcore's (.venv: torch, megatron-core, transformers; run
# scripts/setup.sh first) after its own packages, so a peer's own pins win and torch is not installed again.
# ModelOpt's importer runs in .venv itself: ModelOpt is hf2mcore's own dependency (quantize).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 2; }
site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
base=$(.venv/bin/python -c "import sys; print(sys._base_executable)")

peer() {
  local name=$1
  shift
  [ -x ".peers/$name/bin/python" ] || "$base" -m venv ".peers/$name"
  own=$(".peers/$name/bin/python" -c "import site; print(site.getsitepackages()[0])")
  echo "import site; site.addsitedir('$site')" > "$own/hf2mcore-env.pth"
  ".peers/$name/bin/python" -m pip install -q "$@"
}

# ms-swift's bridge; datasets and pillow are imported by it but not declared
peer mcore-bridge mcore-bridge==1.6.5 datasets pillow
peer mbridge mbridge==0.15.1
