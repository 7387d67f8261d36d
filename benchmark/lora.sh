#!/usr/bin/env bash
# The LoRA benchmark behind docs/benchmarks.md ("LoRA adapters", issue 21): output tokens/s at 32 streams
# spread over 4 adapters against the base model alone, on one server, in one run. Writes 4 random PEFT
# adapters for the model (`random-lora`: ranks 8, 16, 8, 16, every projection), starts the launcher with
# them (all 4 on the device), then runs `serve` on the base model and `serve --models a0,a1,a2,a3` in turn,
# ROUNDS times, and compares them (`lora-compare`; the issue's target: at least 80% of the base rate).
# Results: $OUT/lora-{base,adapters}-r{round}.json. A smoke test of this script at a tiny size:
# MODEL_DIR=<tiny model> STREAMS=2 TOKENS=8 REQUESTS=4 ROUNDS=1 (tests/e2e/test_lora.py).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-docs/benchmarks/lora}
PORT=${PORT:-3998}
STREAMS=${STREAMS:-32}
TOKENS=${TOKENS:-64}
INPUT=${INPUT:-32}
REQUESTS=${REQUESTS:-$((4 * STREAMS))}
ROUNDS=${ROUNDS:-2}
RANKS=${RANKS:-8 16 8 16}
TARGETS=${TARGETS:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
ADAPTERS=${ADAPTERS:-/tmp/lora-bench-adapters}
SOCK=${SOCK:-/tmp/tgi-lora-bench}
mkdir -p "$OUT" "$ADAPTERS"

# MODEL_DIR: another model's directory (else the default model, as the launcher serves it by default).
model_flags=()
if [ -n "${MODEL_DIR:-}" ]; then
  model_flags=(--model-id "$MODEL_DIR")
else
  MODEL_DIR=$($BIN/python -c "from launcher.weights import WeightsConfig, resolve; print(resolve(WeightsConfig()).path)")
fi

names=()
entries=()
i=0
for rank in $RANKS; do
  $BIN/text-generation-benchmark random-lora --model-dir "$MODEL_DIR" --output "$ADAPTERS/a$i" --rank "$rank" \
    --targets "$TARGETS" --seed "$i"
  names+=("a$i")
  entries+=("a$i=$ADAPTERS/a$i")
  i=$((i + 1))
done
models=$(IFS=,; echo "${names[*]}")
lora_adapters=$(IFS=,; echo "${entries[*]}")

$BIN/text-generation-launcher "${model_flags[@]}" --hostname 127.0.0.1 --port "$PORT" \
  --shard-uds-path "$SOCK" --lora-adapters "$lora_adapters" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 900); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $pid 2> /dev/null || { echo "the launcher exited" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "the server never became healthy" >&2; exit 1; }

serve() {  # label, output file, extra serve flags...
  local label=$1 out=$2
  shift 2
  $BIN/text-generation-benchmark serve --url "http://127.0.0.1:$PORT" --api openai-completions \
    --concurrency "$STREAMS" --requests-per-level "$REQUESTS" --max-new-tokens "$TOKENS" \
    --input-tokens "$INPUT" --ignore-eos --warmup 4 --no-progress --label "$label" --output "$out" "$@"
}

base=()
adapters=()
for round in $(seq "$ROUNDS"); do
  # A seed per round: new prompts, so that no round reuses the prefix cache of the one before.
  serve "base r$round" "$OUT/lora-base-r$round.json" --seed "$round"
  serve "${#names[@]} adapters r$round" "$OUT/lora-adapters-r$round.json" --seed "$round" --models "$models"
  base+=("$OUT/lora-base-r$round.json")
  adapters+=("$OUT/lora-adapters-r$round.json")
done
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^(vllm:lora_requests_info|tgi_lora_requests_total)' || true
kill $pid; wait $pid || true
trap - EXIT

$BIN/text-generation-benchmark lora-compare --base "${base[@]}" --adapters "${adapters[@]}"
