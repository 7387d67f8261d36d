#!/usr/bin/env bash
# The standard sweep behind docs/benchmarks.md (`make bench`): hardware floors, transformers' generate as
# the baseline, our server, and (when LLAMA_SERVER points at a llama-server binary) llama.cpp's server on
# the same GGUF, all in one run on one machine, then the comparison plots. Results: docs/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-docs/benchmarks}
PORT=${PORT:-3999}
LLAMA_PORT=${LLAMA_PORT:-8099}
LEVELS=${LEVELS:-1,8,32,64}
TOKENS=${TOKENS:-64}
INPUT=${INPUT:-32}
mkdir -p "$OUT"

wait_healthy() {  # url
  for _ in $(seq 900); do curl -sf "$1" > /dev/null && return 0; sleep 1; done
  echo "server at $1 never became healthy" >&2; return 1
}

MODEL_DIR=$($BIN/python -c "from launcher.weights import WeightsConfig, resolve; print(resolve(WeightsConfig()).path)")
GGUF=$($BIN/python -c "from launcher.weights import find_default_gguf; print(find_default_gguf()[0])")

# The ceilings of the three arithmetics the modes below use: float32 and bfloat16 products, and int8 ones
# (AMX-INT8 / VNNI) for --quantize int8/int4.
$BIN/text-generation-benchmark floor --model-dir "$MODEL_DIR" --ceilings float32,bfloat16,int8 \
  --output "$OUT/floor.json"
$BIN/text-generation-benchmark baseline --model-dir "$MODEL_DIR" --batch-sizes "$LEVELS" \
  --max-new-tokens "$TOKENS" --floor "$OUT/floor.json" --output "$OUT/baseline.json"

SWEEP=(--api openai-completions --concurrency "$LEVELS" --max-new-tokens "$TOKENS" --input-tokens "$INPUT"
       --ignore-eos --seed 0)

run_ours() {  # label, output file, extra launcher flags...
  local label=$1 out=$2
  shift 2
  $BIN/text-generation-launcher --hostname 127.0.0.1 --port "$PORT" --shard-uds-path /tmp/tgi-bench "$@" &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
  wait_healthy "http://127.0.0.1:$PORT/health"
  $BIN/text-generation-benchmark serve --url "http://127.0.0.1:$PORT" "${SWEEP[@]}" --label "$label" \
    --output "$out"
  kill $pid; wait $pid || true
  trap - EXIT
  files+=("$out")
}

files=()
# What `make run` serves: no --dtype, so bfloat16 on CPUs with AVX512-BF16 or AMX (half the bytes per decode
# step, and about twice float32's matrix-multiply rate or more), float32 elsewhere (shard/dtypes.py); the
# launcher's log says which.
run_ours ours "$OUT/serve-ours.json"
run_ours "ours float32" "$OUT/serve-ours-float32.json" --dtype float32
# int4 weights (GGUF Q4_1's layout, on int8 activations): about as many bytes per step as llama-server's.
run_ours "ours int4" "$OUT/serve-ours-int4.json" --quantize int4

if [ -n "${LLAMA_SERVER:-}" ]; then
  # shellcheck disable=SC2086  # LLAMA_FLAGS: extra flags, word-split (e.g. --no-repack, docs/benchmarks.md)
  "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$LLAMA_PORT" -t 2 --parallel 64 -c 16384 ${LLAMA_FLAGS:-} > "$OUT/llama-server.log" 2>&1 &
  lpid=$!
  trap 'kill $lpid 2>/dev/null; wait $lpid 2>/dev/null' EXIT
  wait_healthy "http://127.0.0.1:$LLAMA_PORT/health"
  $BIN/text-generation-benchmark serve --url "http://127.0.0.1:$LLAMA_PORT" "${SWEEP[@]}" --label llama.cpp \
    --output "$OUT/serve-llama.cpp.json"
  kill $lpid; wait $lpid || true
  trap - EXIT
  rm -f "$OUT/llama-server.log"
  files+=("$OUT/serve-llama.cpp.json")
fi

$BIN/text-generation-benchmark plot "${files[@]}" --output-dir "$OUT"
