# lightning_split: `make test` and `make demo` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint proto clean

setup: $(STAMP)

# torch==2.13.0 first: on these machines it is a CPU build on local disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check lightning_split tests benchmarks
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) -m lightning_split.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_split tests benchmarks

# Regenerate the protobuf and gRPC code from lightning_split/_proto/split.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. lightning_split/_proto/split.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
