#!/usr/bin/env bash
# GPU smoke run (on a machine with an NVIDIA GPU): installs vLLM into the project's
# environment, runs the tiny pipeline on the GPU (bf16, NCCL, ZeRO-2, vLLM generation),
# then compares vLLM and transformers generation on the same checkpoint and prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q "torch==2.13.0" && .venv-gpu/bin/pip install -q --no-build-isolation "deepspeed==0.19.8"
.venv-gpu/bin/pip install -q -e ".[dev,vllm]"
.venv-gpu/bin/alignflow run configs/tiny-gpu.yaml --summary-out bench/results/gpu_smoke_summary.json
CKPT=$(.venv-gpu/bin/python -c "import json; print(json.load(open('bench/results/gpu_smoke_summary.json'))['policy_checkpoint_uri'].removeprefix('file://'))")
.venv-gpu/bin/python bench/generation.py --checkpoint "$CKPT"
