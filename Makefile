# bitseg — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := proto/bitseg/v1/bitseg.proto
STUBS  := bitseg/v1/bitseg_pb2.py
PORT   ?= 50051
HTTP_PORT ?= 8051
PROFILES ?= 100000

.PHONY: install proto pg browser test bench bench-10m lint run clean

# `pip install` builds the package, and its build step (setup.py) generates the gRPC
# stubs in bitseg/v1 from proto/, so a plain `pip install -e .` works as well.
$(STAMP): pyproject.toml setup.py $(PROTO)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# For developers changing the .proto: regenerate the stubs without reinstalling.
proto: install
	$(BIN)/python setup.py --quiet build_proto

$(STUBS): $(PROTO) | $(STAMP)
	$(MAKE) --no-print-directory proto

# The sql-source tests start their own PostgreSQL server (tests/conftest_pg.py) and need its
# binaries: Debian keeps initdb in /usr/lib/postgresql/N/bin, which pg_config --bindir names.
PG_INITDB = { pg_config --bindir 2>/dev/null | sed 's|$$|/initdb|'; \
	ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null; } | while read -r f; do \
	test -x "$$f" && echo "$$f"; done | head -n 1

pg:
	@found=$$($(PG_INITDB)); \
	if [ -n "$$found" ]; then echo "PostgreSQL: $$found"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql \
		&& found=$$($(PG_INITDB)) && [ -n "$$found" ] && echo "PostgreSQL: $$found"; \
	else \
		echo "make pg: PostgreSQL's initdb not found and not root to install it;" \
			"run: sudo apt-get install -y postgresql" >&2; exit 1; \
	fi

# The console tests (tests/test_console.py) drive Debian's chromium through Playwright
# (its own browser downloads are never used).
browser:
	@found=$$(command -v chromium || true); \
	if [ -n "$$found" ]; then echo "Chromium: $$found"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
		&& found=$$(command -v chromium) && echo "Chromium: $$found"; \
	else \
		echo "make browser: chromium not found and not root to install it;" \
			"run: sudo apt-get install -y chromium" >&2; exit 1; \
	fi

test: install pg browser $(STUBS)
	$(BIN)/python -m pytest -q

bench: install pg $(STUBS)
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable --benchmark-columns=min,median,mean,max,rounds -s

bench-10m: install pg $(STUBS)
	BITSEG_BENCH_PROFILES=10000000 $(BIN)/python -m pytest benchmarks -q --benchmark-enable \
		--benchmark-columns=min,median,mean,max,rounds -s

lint: install
	$(BIN)/ruff check .

# Demo: generate, load, serve (gRPC on PORT, the console on HTTP_PORT), and show the first
# queries; Ctrl-C stops the server.
run: install $(STUBS)
	PORT=$(PORT) HTTP_PORT=$(HTTP_PORT) PROFILES=$(PROFILES) bash scripts/demo.sh

clean:
	rm -rf $(VENV) demo build dist *.egg-info .pytest_cache .hypothesis .benchmarks bitseg/v1
