# bitseg — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := proto/bitseg/v1/bitseg.proto
STUBS  := bitseg/v1/bitseg_pb2.py
PORT   ?= 50051
PROFILES ?= 100000

.PHONY: install proto test bench bench-10m lint run clean

# The stubs are generated from proto/ (never edited by hand), before the package is
# installed, so that the install includes them.
$(STAMP): pyproject.toml $(PROTO)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "grpcio-tools>=1.60,<2"
	$(MAKE) --no-print-directory proto
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

proto:
	mkdir -p bitseg/v1
	touch bitseg/v1/__init__.py
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
		--grpc_python_out=. $(PROTO)

$(STUBS): $(PROTO) | $(STAMP)
	$(MAKE) --no-print-directory proto

test: install $(STUBS)
	$(BIN)/python -m pytest -q

bench: install $(STUBS)
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable --benchmark-columns=min,median,mean,max,rounds -s

bench-10m: install $(STUBS)
	BITSEG_BENCH_PROFILES=10000000 $(BIN)/python -m pytest benchmarks -q --benchmark-enable \
		--benchmark-columns=min,median,mean,max,rounds -s

lint: install
	$(BIN)/ruff check .

# Demo: generate, load, serve, and show the first queries; Ctrl-C stops the server.
run: install $(STUBS)
	PORT=$(PORT) PROFILES=$(PROFILES) bash scripts/demo.sh

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .hypothesis .benchmarks bitseg/v1
