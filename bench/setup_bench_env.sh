#!/usr/bin/env bash
# The benchmarks' own environment: the project (as in .venv) plus TRL and py-spy.
#
#   bench/setup_bench_env.sh            # creates /work/main/.venv-bench (idempotent)
#   BENCH_VENV=/tmp/venv bench/setup_bench_env.sh
#
# torch first (pip takes 2.13.0+cpu from /opt/wheels), then DeepSpeed built against it without
# build isolation, then the project, then TRL. TRL must not move transformers off the
# project's version: the script checks that pip kept it, and fails loudly otherwise
# (then give TRL a venv of its own and run our side in .venv: see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${BENCH_VENV:-$REPO/.venv-bench}
PYTHON=${PYTHON:-python3}

if [ -f "$VENV/.installed" ]; then
  echo "bench env ready: $VENV"; exit 0
fi
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q --no-build-isolation "deepspeed==0.19.8"
"$PY" -m pip install -q -e "$REPO[dev]"
TF_BEFORE=$("$PY" -c 'import transformers; print(transformers.__version__)')
# TRL, and what it needs; constrain transformers to the project's version.
"$PY" -m pip install -q trl py-spy "transformers==$TF_BEFORE"
TF_AFTER=$("$PY" -c 'import transformers; print(transformers.__version__)')
if [ "$TF_BEFORE" != "$TF_AFTER" ]; then
  echo "TRL moved transformers $TF_BEFORE -> $TF_AFTER: not the project's environment" >&2; exit 1
fi
"$PY" - <<'PY'
import torch, transformers, trl, deepspeed, stages.common.models  # noqa: F401
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"deepspeed {deepspeed.__version__}")
PY
touch "$VENV/.installed"
echo "bench env ready: $VENV"
