# pumer-lightning: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= shapes_vilt
ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format clean overhead exp tune bench study shapes data loader-bench

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install the project editable with dev extras

test: $(STAMP) ## fast tests (offline, CPU)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) ## all tests, including the ones marked slow
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check pumer_lightning tests
	$(BIN)/ruff format --check pumer_lightning tests

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix pumer_lightning tests
	$(BIN)/ruff format pumer_lightning tests

overhead: $(STAMP) ## time one reduction step against one ViLT-B layer on CPU
	$(BIN)/python -m pumer_lightning.models.overhead

exp: $(STAMP) ## run an experiment end to end: pre-train its starting weights once if missing, fit, test the best checkpoint (EXP=name ARGS="--overrides")
	$(BIN)/python -m pumer_lightning.exp $(EXP) $(ARGS)

tune: $(STAMP) ## choose a reducer schedule for the latest make exp checkpoint: front, recommended YAML (EXP=name ARGS="--max-drop 1")
	$(BIN)/python -m pumer_lightning.tune $(EXP) $(ARGS)

DATASET ?= nlvr2
SRC ?= data/raw/$(DATASET)
shapes: $(STAMP) ## synthetic shapes world (4 tasks) + tokenizer under data/shapes
	$(BIN)/python -m pumer_lightning.data.shapes --out data/shapes --num-train 2000 --num-val 500 --num-test 500 --seed 0 --tasks nlvr2,vqa2,snli_ve,retrieval --image-size 384

data: $(STAMP) ## convert official files to shards: make data DATASET=nlvr2|vqa2|snli_ve|flickr30k|coco SRC=dir
	$(BIN)/python -m pumer_lightning.data.prepare $(DATASET) --src $(SRC) --out data/$(DATASET)

loader-bench: $(STAMP) ## data loader throughput (examples/s per worker) at 384 px, on the shapes NLVR2 shards
	@test -d data/shapes/nlvr2 || $(MAKE) shapes
	$(BIN)/python -m pumer_lightning.data.throughput --data-dir data/shapes/nlvr2 --image-size 384 --workers 1,2

# `make bench` alone measures the two NLVR2 settings the README and docs/bench.md quote; EXP=name (or a list) picks others
BENCH_EXP = $(if $(filter command line environment,$(origin EXP)),$(EXP),vilt_nlvr2 meter_nlvr2)
bench: $(STAMP) ## throughput, memory and FLOPs: baseline vs PuMer settings at full size (EXP=vilt_nlvr2 ...)
	$(BIN)/python -m pumer_lightning.bench $(BENCH_EXP) $(ARGS)

study: $(STAMP) ## does PuMer keep accuracy? the paper protocol on shapes VQA + NLVR2 (1 h 48 min measured on 2 CPU cores, resumes from its cache; ARGS="--budget quick", ARGS="--protocol adaptation")
	$(BIN)/python -m pumer_lightning.study $(ARGS)

clean: ## remove caches and logs (keeps .venv and data/)
	rm -rf .pytest_cache .ruff_cache lightning_logs tb_logs outputs

.PHONY: gpu-check
gpu-check: $(STAMP) ## every GPU measurement of the bench, one call, under 8 min on an H100/H200 (GPU_CHECK_TINY=1: CPU smoke run)
	scripts/gpu_check.sh
