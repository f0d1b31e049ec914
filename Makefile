# make install | test | demo | lint | bench. `make test` and `make demo` install what they need themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Set TORCH to pick a build before installing, e.g. `make install TORCH=torch==2.13.0` (CPU wheel on our CI).
TORCH ?=

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/neftune validate recipes/demo.yaml > /dev/null
	$(BIN)/neftune data preview recipes/demo.yaml -n 1
	$(BIN)/neftune train recipes/demo.yaml --overwrite
	$(BIN)/neftune merge runs/demo --out merged/demo --overwrite

lint: install
	$(BIN)/ruff check neftune_cli tests benchmarks

bench: install
	$(BIN)/python benchmarks/tokenize_data.py
	$(BIN)/python benchmarks/merge.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf runs merged .pytest_cache
