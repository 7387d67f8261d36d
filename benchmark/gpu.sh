#!/usr/bin/env bash
# The GPU check behind docs/benchmarks.md ("On a GPU"), all in one run on one GPU: a 1B-parameter
# Llama-shaped model with random bfloat16 weights (`random-model`), its memory-bandwidth floor, the shard
# benchmark at batch 1, 64 and 256 with CUDA graphs and without, and transformers' generate as the baseline.
# `make bench-gpu`; on a machine with its own Python (torch, grpcio, transformers) and the generated proto
# stubs: PYTHON=python3 OUT=/some/dir bash benchmark/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-docs/benchmarks}
SHAPE=${SHAPE:-llama-1b}
DEVICE=${DEVICE:-cuda}  # SHAPE=tiny DEVICE=cpu: a smoke test of this script (tests/e2e/test_gpu_script.py)
MODEL=${MODEL:-/tmp/$SHAPE-random}
SOCK=${SOCK:-/tmp/tgi-gpu-bench}
BATCHES=${BATCHES:-1,64,256}
mkdir -p "$OUT"

[ -f "$MODEL/model.safetensors" ] || $PY -m benchmark random-model --shape "$SHAPE" --output "$MODEL"
$PY -m benchmark floor --device "$DEVICE" --dtype bfloat16 --model-dir "$MODEL" --output "$OUT/gpu-floor.json"

shard_bench() {  # label, extra shard flags...
  local label=$1
  shift
  rm -f "$SOCK-0"
  $PY -m shard serve "$MODEL" --uds-path "$SOCK" --dtype bfloat16 --speculate 0 "$@" &
  local pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
  for _ in $(seq 600); do [ -S "$SOCK-0" ] && break; kill -0 $pid || exit 1; sleep 0.5; done
  $PY -m benchmark shard --uds-path "$SOCK" --batch-sizes "$BATCHES" --sequence-length 32 --decode-length 64 \
    --warmups 1 --runs 3 --floor "$OUT/gpu-floor.json" --no-progress --output "$OUT/gpu-shard-$label.json"
  kill $pid; wait $pid || true
  trap - EXIT
}
shard_bench graphs
shard_bench eager --cuda-graphs 0
$PY -m benchmark baseline --model-dir "$MODEL" --device "$DEVICE" --dtype bfloat16 --batch-sizes "$BATCHES" \
  --max-new-tokens 64 --runs 2 --floor "$OUT/gpu-floor.json" --no-progress --output "$OUT/gpu-baseline.json"
