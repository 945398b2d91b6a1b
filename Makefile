# aifed: `make demo` runs a local federation on loopback; `make test` runs the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: all install services demo test fuzz proto proto-check clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aifed needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plot]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install aifed with its development tools

demo: $(STAMP)  ## start 3 hubs and 2 antennas on loopback, run jobs through them, stop
	$(BIN)/aifed demo

services:  ## install Slurm, munge, etcd and Mosquitto if missing (the tests start private instances)
	bash scripts/install-services.sh

test: $(STAMP) services  ## the whole suite (installs what the tests need; they start it)
	$(BIN)/python -m pytest -q

fuzz: $(STAMP)  ## property-based fuzzing with thousands of examples (tests/test_fuzz.py, hypothesis profile "long")
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/test_fuzz.py

proto: $(STAMP)  ## regenerate federation/pb from proto/
	$(BIN)/python proto/generate.py

proto-check: $(STAMP)
	$(BIN)/python proto/generate.py --check

clean:
	rm -rf var .pytest_cache build *.egg-info
