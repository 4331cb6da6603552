# llmgrpc: the two commands a newcomer needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch stays an unpinned dependency of the package; this pin takes the CPU build for
# development machines without a GPU. Override with TORCH=torch (CUDA) where you have one.
TORCH  ?= torch==2.13.0
# llama-cpp-python builds from source with the project's one recipe (deploy/llama-cpp/recipe.env:
# every x86-64 CPU variant, chosen at run time; no AMX): about 15 minutes once, then the wheel
# kept under the recipe's name installs in seconds. LLAMA_CPP_EXTRA_CMAKE_ARGS=-DGGML_CUDA=on
# adds CUDA.
BUF    := protos/node_modules/.bin/buf
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: install serve test lint generate clean gpu-pack gpu-check

install: $(VENV)/.installed $(BUF)

$(VENV)/.installed: pyproject.toml deploy/llama-cpp/recipe.env deploy/llama-cpp/build.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	deploy/llama-cpp/build.sh $(PY)
	$(PIP) install -q -e ".[transformers,llamacpp,modelscope,dev]"
	touch $@

# buf, the protobuf linter the contract tests run (protos/package.json pins it).
$(BUF): protos/package.json
	cd protos && npm install --no-audit --no-fund --silent
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/llmgrpc serve --host $(HOST) --port $(PORT) --launch tiny-llama-3.1

test: install
	$(PY) -m pytest -q

# The Shepherd Model Gateway (smg, from the dev extra) in front of llmgrpc servers on this machine:
# OpenAI's /v1/completions and /v1/chat/completions on GATEWAY_PORT, its metrics on
# GATEWAY_METRICS_PORT. `make serve` in one shell, `make gateway` in another. WORKERS: the
# servers' engine-contract listeners (a server's main port serves its one model).
GATEWAY_PORT         ?= 8000
GATEWAY_METRICS_PORT ?= 29000
WORKERS              ?= $(HOST):$(PORT)
.PHONY: gateway
gateway: $(VENV)/.installed
	$(VENV)/bin/smg launch --backend vllm --worker-urls $(addprefix grpc://,$(WORKERS)) \
		--tool-call-parser llama --policy cache_aware \
		--host $(HOST) --port $(GATEWAY_PORT) --prometheus-port $(GATEWAY_METRICS_PORT)

lint: install
	$(BUF) lint protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint deploy/Containerfile

# Rewrite clients/v1 from protos/llmgrpc/v1, worker/v1 from protos/llmgrpc/worker/v1, and
# server/kserve_v2, server/tgis_v1 from the inference protocols protos/llmgrpc/kserve/v2, tgis/v1
# (never edit the generated files by hand).
generate: $(VENV)/.installed
	rm -rf clients/v1 worker/v1 server/kserve_v2 server/tgis_v1
	$(PY) protos/generate.py

# On a release: the protos being released become the contract `buf breaking` guards
# (protos/released/README.md). Only the public llmgrpc/v1; the worker protocol may change freely.
.PHONY: release-contract
release-contract: $(BUF)
	$(BUF) build protos --path protos/llmgrpc/v1 -o protos/released/llmgrpc-v1.binpb

# vLLM built for this CPU, with Ray (its executor across hosts, docs/multi-node.md), in its own
# environment (deploy/vllm-cpu/build.sh): about 10 minutes the first time (and after a change to
# patch_source.py), then the cached wheel installs in about a minute. Workers of engine vLLM
# run on its python: LLMGRPC_WORKER_PYTHON='{"vLLM": "$(CURDIR)/$(VLLM_VENV)/bin/python"}'.
VLLM_VENV ?= .venv-vllm
.PHONY: vllm-cpu test-vllm
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml deploy/vllm-cpu/build.sh deploy/vllm-cpu/patch_source.py
	deploy/vllm-cpu/build.sh $(VLLM_VENV)

# The vLLM integration tests: the tiny model on vLLM through the gRPC service.
test-vllm: install vllm-cpu
	LLMGRPC_TEST_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/test_vllm.py

# vLLM (CPU build) against the Transformers engine, both through llmgrpc, then the multi-turn
# conversations (benchmarks/conversations.py) on Transformers against vLLM's own OpenAI server with
# prefix caching: docs/benchmarks-vllm.md. BENCH_ARGS=--quick: a smoke run into build/bench-quick.
.PHONY: bench-vllm
bench-vllm: $(VENV)/.bench-installed vllm-cpu
	$(PY) benchmarks/vllm_cpu.py --vllm-python $(VLLM_VENV)/bin/python $(BENCH_ARGS)

# The GPU check: pack here (needs the package registry), run on a CUDA machine with
# `make gpu-check` (or benchmarks/gpu_check.sh build/gpu-check REPORT_DIR with its own python3).
GPU_PACK   := build/gpu-check
GPU_PYTHON ?= 3.12
GPU_WHEELS := transformers==5.24.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
	grpcio-status==1.85.3 googleapis-common-protos protobuf==7.36.2 pydantic==2.14.4 pydantic-core==2.50.5 \
	pydantic-settings==2.16.3 python-dotenv typing-inspection annotated-types
gpu-pack: $(VENV)/.installed
	rm -rf $(GPU_PACK) && mkdir -p $(GPU_PACK)/wheels
	$(PIP) wheel -q --no-deps -w $(GPU_PACK)/wheels .
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_PACK)/wheels $(GPU_WHEELS)
	du -sh $(GPU_PACK)

gpu-check:
	benchmarks/gpu_check.sh $(GPU_PACK) build/gpu-report

# A few minutes of 32 concurrent streams with random cancellations and deadlines against
# `llmgrpc serve --launch tiny-llama-3.1` (not in CI): errors, memory, p99 latencies.
SOAK_S ?= 120
SOAK_CONCURRENCY ?= 32
.PHONY: soak
soak: $(VENV)/.installed
	$(PY) benchmarks/soak.py --duration $(SOAK_S) --concurrency $(SOAK_CONCURRENCY)
	$(PY) benchmarks/neighbour.py

# The benchmark suite (benchmarks/suite.py): overhead, scaling, peers, smg's OpenAI HTTP API in
# front of llmgrpc against Generate, transport ceiling and start-up; writes docs/benchmarks.md and
# its plots (about ten minutes on 2 cores).
# BENCH_ARGS=--quick: a smoke run of about a minute into build/bench-quick (what CI runs).
# Then benchmarks/protocols.py: 16 streams through KServe's ModelStreamInfer against Generate
# (fails below 0.95 of Generate's tok/s, except with --quick; numbers in build/bench-protocols.json).
# Then benchmarks/constrained.py: JSON Schema against unconstrained decoding, tok/s of the 100M
# model at 1 and 16 streams on llama.cpp and Transformers (table in build/bench-constrained).
# Then benchmarks/lora.py: 16 streams spread over 4 LoRA adapters against all 16 on the base model,
# on both engines (table in build/bench-lora).
# Then benchmarks/multiturn.py: 10-turn conversations with and without the prefix cache, beside
# xllamacpp (docs/benchmarks-multiturn.md).
BENCH_ARGS ?=
.PHONY: bench
bench: $(VENV)/.bench-installed
	$(PY) benchmarks/suite.py $(BENCH_ARGS)
	$(PY) benchmarks/protocols.py $(BENCH_ARGS)
	$(PY) benchmarks/constrained.py $(BENCH_ARGS)
	$(PY) benchmarks/lora.py $(BENCH_ARGS)
	$(PY) benchmarks/multiturn.py $(BENCH_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) protos/node_modules build *.egg-info
