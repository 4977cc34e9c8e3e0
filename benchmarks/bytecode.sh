#!/bin/bash
# Start-up where Python may not write bytecode beside the sources (PYTHONDONTWRITEBYTECODE) and torch came without
# it (RESULTS.md, session 13): a tiny Llama conversion through torch, alternated A B for ROUNDS rounds, with
# imports.cache_bytecode disabled (A) and as shipped (B); B's first run compiles into an empty cache.
# Env: CONFIGS (the hf_configs folder), PY, ROUNDS. Run from the repository root.
set -euo pipefail
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF2MCORE_HF_CONFIGS=${CONFIGS:-../shared/hf_configs}
export HF2MCORE_CACHE=$work/cache HF2MCORE_REPLAY=off PYTHONDONTWRITEBYTECODE=1 CUDA_VISIBLE_DEVICES=
$PY -c "import sys, torch; from tiny import make_model, tiny_config
make_model(tiny_config('meta-llama/Llama-3.2-1B'), sys.argv[1], dtype=torch.bfloat16)" "$work/tiny" > /dev/null
A="import converter.imports as i; i.cache_bytecode = lambda *a, **k: None; from converter.cli import run; run()"
B="from converter.cli import run; run()"
for r in $(seq "$ROUNDS"); do
    for v in A B; do
        rm -rf "$work/out"
        /usr/bin/time -o "$work/t" -f "%e" $PY -W ignore -c "${!v}" convert "$work/tiny" "$work/out" --no-progress > /dev/null
        echo "round $r $v $(cat "$work/t") s"
    done
done
echo "bytecode cached: $(find "$work/cache/pycache" -name '*.pyc' 2>/dev/null | wc -l) files"
