#!/bin/bash
# Start-up where Python may not write bytecode beside the sources (PYTHONDONTWRITEBYTECODE) and torch came without
# it (RESULTS.md, session 13): a tiny Llama conversion through torch, alternated A B C for ROUNDS rounds, with
# imports.cache_bytecode disabled (A) and as shipped (B); B's first run compiles into an empty cache. C is B with
# hf2mcore's own modules left without bytecode, as an editable install leaves them (scripts/setup.sh compiles them:
# session 21).
# Env: CONFIGS (the hf_configs folder), PY, ROUNDS. Run from the repository root.
set -euo pipefail
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
paths=${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH="$PWD:$PWD/tests$paths" HF2MCORE_HF_CONFIGS=${CONFIGS:-../shared/hf_configs}
$PY -m compileall -q converter mappings  # A and B: this checkout as scripts/setup.sh leaves it
mkdir "$work/src" && cp -r converter mappings "$work/src/" && find "$work/src" -name __pycache__ -exec rm -rf {} +
export HF2MCORE_CACHE=$work/cache HF2MCORE_REPLAY=off PYTHONDONTWRITEBYTECODE=1 CUDA_VISIBLE_DEVICES=
$PY -c "import sys, torch; from tiny import make_model, tiny_config
make_model(tiny_config('meta-llama/Llama-3.2-1B'), sys.argv[1], dtype=torch.bfloat16)" "$work/tiny" > /dev/null
A="import converter.imports as i; i.cache_bytecode = lambda *a, **k: None; from converter.cli import run; run()"
B="from converter.cli import run; run()"
C=$B
for r in $(seq "$ROUNDS"); do
    order="A B C"; [ $((r % 2)) = 0 ] && order="C B A"  # (no variant always right after the same one)
    for v in $order; do
        rm -rf "$work/out"
        src=$PWD; [ $v = C ] && src=$work/src
        # (-P: hf2mcore from $src, not from the working directory)
        PYTHONPATH="$src:$PWD/tests$paths" /usr/bin/time -o "$work/t" -f "%e" $PY -P -W ignore -c "${!v}" convert \
            "$work/tiny" "$work/out" --no-progress > /dev/null
        echo "round $r $v $(cat "$work/t") s"
    done
done | tee "$work/log"
$PY - "$work/log" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    _, r, v, s, _ = line.split()
    t.setdefault(v, []).append(float(s))
for v in "AC":
    print(f"median {v} / B, paired: {statistics.median(x / y for x, y in zip(t[v], t['B'])):.3f}")
EOF
echo "bytecode cached: $(find "$work/cache/pycache" -name '*.pyc' 2>/dev/null | wc -l) files"
