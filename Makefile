# make install | test | test-tf4 | demo | lint | bench. Each target installs what it needs itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A second venv with the other transformers major version users serve with: `make test-tf4` runs the suite there.
VENV_TF4 ?= .venv-tf4
TF4 ?= transformers==4.57.*
# Set TORCH to pick a build before installing, e.g. `make install TORCH=torch==2.13.0` (CPU wheel on our CI).
TORCH ?=

.PHONY: install test test-tf4 demo lint bench bench-gpu clean
# `make demo` answers the held-out demo prompts before and after fine-tuning with these settings.
DEMO_GENERATE := --prompts recipes/data/demo_eval.jsonl --format jsonl --repetition-penalty 1 \
	--max-new-tokens 32 --batch-size 50

install: $(VENV)/.installed

$(VENV)/.installed $(VENV_TF4)/.installed: pyproject.toml
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(if $(TORCH),$(@D)/bin/pip install -q "$(TORCH)")
	$(@D)/bin/pip install -q -e ".[dev]" $(if $(filter $(VENV_TF4),$(@D)),"$(TF4)")
	touch $@

test: install
	$(BIN)/python -m pytest

# The suite under transformers 4.57; tests/test_parity.py also loads the folders it writes with the main venv's 5.x.
test-tf4: install $(VENV_TF4)/.installed
	NEFTUNE_OTHER_PYTHON=$(abspath $(BIN))/python $(VENV_TF4)/bin/python -m pytest

demo: install
	$(BIN)/neftune validate recipes/demo.yaml > /dev/null
	$(BIN)/neftune data preview recipes/demo.yaml -n 1
	$(BIN)/neftune train recipes/demo.yaml --overwrite
	$(BIN)/neftune merge runs/demo --out merged/demo --overwrite
	@# held-out prompts, greedy, no repetition penalty (short exact answers; the paper's 1.2 is for long ones)
	$(BIN)/neftune generate builtin:tiny-llama --template alpaca $(DEMO_GENERATE) --out runs/demo-answers/before.jsonl --overwrite
	$(BIN)/neftune generate merged/demo $(DEMO_GENERATE) --out runs/demo-answers/after.jsonl --overwrite
	$(BIN)/python -m neftune_cli.demo.check runs/demo-answers/before.jsonl runs/demo-answers/after.jsonl

lint: install
	$(BIN)/ruff check neftune_cli tests benchmarks

bench: install
	$(BIN)/python benchmarks/tokenize_data.py
	$(BIN)/python benchmarks/merge.py
	$(BIN)/python benchmarks/generate.py --threads 1
	$(BIN)/python benchmarks/train.py

# On a GPU box: ours vs TRL on Llama-2-7B and Llama-3-8B shapes (see the script for carrying wheels to a bare image).
bench-gpu:
	bash benchmarks/gpu.sh

clean:
	rm -rf runs merged .pytest_cache
