#!/bin/bash
# Multi-process conversion on a many-core node (RESULTS.md, session 4), in stages that fit one device call each:
#   benchmarks/node_scaling.sh inputs     make the inputs (Llama-3.2-1B full size; Qwen3-30B-A3B with $LAYERS layers)
#   benchmarks/node_scaling.sh imports    where a process's start-up goes (python -X importtime, largest first)
#   benchmarks/node_scaling.sh timelines  per-rank stages: forked ranks for 1..16 processes, torchrun for 8
#   benchmarks/node_scaling.sh bench      run.py: floor and hf2mcore with $PROCS processes (1 4 8 16)
# Env: CONFIGS (the hf_configs folder), WORK (inputs and outputs), PY, LAYERS, REPEAT, PROCS.
set -euo pipefail
PY=${PY:-python3}
CONFIGS=${CONFIGS:-../shared/hf_configs}
WORK=${WORK:-/tmp/hf2mcore-scaling}
LAYERS=${LAYERS:-12}
REPEAT=${REPEAT:-3}
PROCS=${PROCS:-1 4 8 16}
LLAMA=$WORK/llama-3.2-1b
MOE=$WORK/qwen3-30b-a3b-${LAYERS}l
mkdir -p "$WORK"
echo "$(date -u +%FT%TZ) $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM; torch $($PY -c 'import torch; print(torch.__version__)')"
case $1 in
inputs)
    [ -d "$LLAMA" ] || $PY benchmarks/make_checkpoint.py "$CONFIGS/meta-llama/Llama-3.2-1B/config.json" "$LLAMA"
    [ -d "$MOE" ] || $PY benchmarks/make_checkpoint.py "$CONFIGS/Qwen/Qwen3-30B-A3B/config.json" "$MOE" --layers "$LAYERS"
    du -sh "$LLAMA" "$MOE"
    ;;
imports)
    for run in cold warm; do
        CUDA_VISIBLE_DEVICES= $PY -X importtime -c "import converter
from converter.imports import import_megatron_eager
import_megatron_eager()
import torch.distributed.checkpoint" 2> "$WORK/importtime-$run.txt"
        echo "$run: top cumulative import times (us)"
        sort -t'|' -k2 -n -r "$WORK/importtime-$run.txt" | awk 'NR <= 12'  # (head would end sort with SIGPIPE)
    done
    ;;
timelines)
    for input in "$LLAMA" "$MOE"; do
        for n in 1 2 4 8 16; do $PY benchmarks/rank_timeline.py "$input" "$WORK/out" $n | awk 'NR <= 4'; done
        $PY benchmarks/rank_timeline.py "$input" "$WORK/out" 8 --torchrun
    done
    ;;
bench)
    for input in "$LLAMA" "$MOE"; do
        $PY benchmarks/run.py "$input" --work "$WORK/bench" --repeat "$REPEAT" --tools floor hf2mcore --procs $PROCS
    done
    ;;
*)
    echo "usage: $0 inputs|imports|timelines|bench" >&2
    exit 2
    ;;
esac
