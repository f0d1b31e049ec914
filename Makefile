# make install | test | test-tf4 | demo | lint | bench | gpu-wheels. Each target installs what it needs itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A second venv with the other transformers major version users serve with: `make test-tf4` runs the suite there.
VENV_TF4 ?= .venv-tf4
TF4 ?= transformers==4.57.*
# Set TORCH to pick a build before installing, e.g. `make install TORCH=torch==2.13.0` (CPU wheel on our CI).
TORCH ?=

.PHONY: install test test-tf4 demo lint bench bench-gpu gpu-wheels gpu-data clean
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

# On a GPU box: ours vs TRL, LoRA/QLoRA/full fine-tuning and generation, one table. `make gpu-wheels` first, here.
bench-gpu:
	bash benchmarks/gpu.sh

# What benchmarks/gpu.sh needs on a bare CUDA image with no package index, into two git-ignored folders that travel
# with the tree: the wheels the image lacks (benchmarks/gpu-requirements.txt, no torch or CUDA libraries, no deps
# resolved here) for GPU_PYTHON on manylinux x86_64, and the Alpaca subset, AlpacaEval prompts and Llama-2
# tokenizer from SHARED_DATA.
GPU_PYTHON ?= 3.12
SHARED_DATA ?= ../shared/data
GPU_PLATFORMS := $(foreach n,2014 _2_17 _2_24 _2_28,--platform manylinux$(n)_x86_64)
gpu-wheels: gpu-data
	rm -rf benchmarks/wheels
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON) \
		$(GPU_PLATFORMS) -d benchmarks/wheels -r benchmarks/gpu-requirements.txt
	@du -sh benchmarks/wheels benchmarks/data

gpu-data:
	@test -f $(SHARED_DATA)/alpaca/alpaca_data_first2k.json || { echo "no $(SHARED_DATA)/alpaca: set SHARED_DATA"; exit 2; }
	rm -rf benchmarks/data
	mkdir -p benchmarks/data/llama2-tokenizer
	install -m 644 $(SHARED_DATA)/alpaca/alpaca_data_first2k.json $(SHARED_DATA)/alpaca_eval/alpaca_eval_instructions.json \
		benchmarks/data/
	install -m 644 $(SHARED_DATA)/tokenizers/llama2/*.json $(SHARED_DATA)/tokenizers/llama2/tokenizer.model \
		benchmarks/data/llama2-tokenizer/

clean:
	rm -rf runs merged .pytest_cache
